"""Corrections come back: a radiologist's corrected SEG, sent by dcmtk storescu to a running
node, is recognised, kept as training data with its provenance, listed by
``dicomnode feedback list``, and never makes a job."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from web.test_pages import page

from dicomnode.app.node import Node
from dicomnode.config import HttpSettings, builtin_bundle
from dicomnode.feedback.collect import FeedbackCollector, feedback_root
from dicomnode.inference.card import load_bundle
from dicomnode.models.data import load_cases
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.spool.feedback import FeedbackInbox, FeedbackState
from dicomnode.synthetic.phantom import Phantom
from integration.peers import describe_jobs, run_storescu, wait_until

RADIOLOGIST_AE = "RADIOLOGY"


def corrected_segmentation(
    node_seg: Path, sources: list[Dataset], *, manufacturer: str = "Example Viewer"
) -> Dataset:
    """What a viewer sends back: the node's mask on its source images, with the first
    segmented slice erased and a sphere added (a different mask), written by another
    creator and implementation."""
    seg = hd.seg.segread(node_seg)
    by_uid = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=bool)
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        mask[by_uid[str(ref.ReferencedSOPInstanceUID)]] |= seg.pixel_array[i] > 0
    first = int(np.flatnonzero(mask.any(axis=(1, 2)))[0])
    mask[first] = False  # the radiologist removed a slice ...
    k, r, c = np.indices(mask.shape)
    mask |= (k - len(sources) // 2) ** 2 + (r - 40) ** 2 + (c - 40) ** 2 <= 16  # ... added one
    corrected = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="lesion (corrected)",
                segmented_property_category=hd.sr.CodedConcept(
                    "49755003", "SCT", "Morphologically Altered Structure"
                ),
                segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=generate_uid(),
        series_number=300,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="Segment Editor",
        software_versions="5.6.2",
        device_serial_number="42",
        content_creator_name="Doe^Jane",
        content_label="CORRECTED",
        series_description="lesion corrected by a radiologist",
    )
    corrected.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7433.1.1"
    corrected.file_meta.ImplementationVersionName = "EXAMPLE_VIEWER"
    return corrected


def processed_study(
    node_factory: Callable[..., Node], folder_scp: FolderSCP, phantom_files: list[Path]
) -> tuple[Node, str, Path]:
    """A node that has processed the phantom study and delivered its SEG and SR."""
    node = node_factory(pacs_port=folder_scp.port)
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
    assert all(r.ok for r in results)
    wait_until(
        lambda: [j.state for j in node.jobs.list_jobs()] == ["done"], 120, "the job to finish"
    )
    (job,) = node.jobs.list_jobs()
    (node_seg,) = node.config.node.data_dir.glob(f"results/job-{job.id}/*-seg.dcm")
    return node, job.study_instance_uid, node_seg


def feedback_list(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "feedback", "list", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_corrected_seg_sent_by_storescu_becomes_training_data_without_a_job(
    node_factory: Callable[..., Node],
    folder_scp: FolderSCP,
    phantom: Phantom,
    phantom_files: list[Path],
    tmp_path: Path,
    require_tool: Callable[[str], str],
) -> None:
    storescu = require_tool("storescu")
    # Given a running node that processed a study and sent its SEG to the PACS
    node, study_uid, node_seg = processed_study(node_factory, folder_scp, phantom_files)
    study_before = node.index.study(study_uid)
    assert study_before is not None
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in phantom_files]
    # When a radiologist's corrected SEG (another creator, another mask) comes back
    corrected = corrected_segmentation(node_seg, sources)
    path = tmp_path / "corrected.dcm"
    corrected.save_as(path, enforce_file_format=True)
    assert not np.array_equal(
        pydicom.dcmread(path).pixel_array.any(axis=0),
        pydicom.dcmread(node_seg).pixel_array.any(axis=0),
    )
    proc = run_storescu(storescu, node.port, [path], calling_ae=RADIOLOGIST_AE)
    assert proc.returncode == 0, proc.stderr
    # Then the node stored it and noted it as it arrived ...
    wait_until(
        lambda: node.index.instance_versions(corrected.SOPInstanceUID), 30, "the SEG in the index"
    )
    # ... and it makes no job: the study stays as it was over several housekeeping rounds
    # (waiting out the quiet period twice: an absence has no event to wait for)
    time.sleep(2 * node.config.completeness.quiet_period_s + 1.0)
    assert len(node.jobs.list_jobs()) == 1, describe_jobs(node)
    study_after = node.index.study(study_uid)
    assert study_after is not None
    assert (study_after.state, study_after.generation) == (
        study_before.state,
        study_before.generation,
    )
    # ... and the running node settles it by itself (housekeeping), as training data
    wait_until(
        lambda: [r.state for r in FeedbackInbox(node.db).records()] == ["accepted"],
        30,
        "the correction settled by the node",
    )
    # And `dicomnode feedback list` shows it, accepted, with where it came from
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{node.config.node.data_dir}"\n')
    listed = feedback_list(config)
    assert listed.returncode == 0, listed.stderr
    assert "accepted" in listed.stdout and f"{RADIOLOGIST_AE}@127.0.0.1" in listed.stdout
    assert "Example Viewer" in listed.stdout
    document = json.loads(feedback_list(config, "--json").stdout)
    (entry,) = document["feedback"]
    assert entry["state"] == "accepted"
    assert entry["sop_instance_uid"] == corrected.SOPInstanceUID
    assert entry["study_instance_uid"] == study_uid
    assert entry["calling_ae"] == RADIOLOGIST_AE and entry["calling_host"] == "127.0.0.1"
    # ... naming the node's SEG and model version it corrects
    node_header = pydicom.dcmread(node_seg, stop_before_pixels=True)
    (job,) = node.jobs.list_jobs()
    assert entry["corrects"] == {
        "job_id": job.id,
        "route": "ct",
        "generation": 1,
        "segmentation_sop_instance_uid": node_header.SOPInstanceUID,
        "model": node_header.ManufacturerModelName,
        "model_version": node_header.SoftwareVersions,
    }
    creator = entry["creator"]
    assert (creator["manufacturer_model_name"], creator["software_versions"]) == (
        "Segment Editor",
        "5.6.2",
    )
    assert creator["content_creator_name"] == "Doe^Jane"
    assert creator["segment_labels"] == ["lesion (corrected)"]
    # ... and the training data is the SEG as it was sent, with its provenance beside it
    copy = node.config.node.data_dir / entry["path"]
    assert copy.parent.parent == feedback_root(node.config.node.data_dir)
    assert (
        copy.read_bytes()
        == node.index.instance_versions(corrected.SOPInstanceUID)[-1].path.read_bytes()
    )
    provenance = json.loads(copy.with_suffix(".json").read_text())
    assert provenance["corrects"] == entry["corrects"]
    assert provenance["received"]["calling_ae"] == RADIOLOGIST_AE
    # ... beside the images it labels: a training set where the correction, not the
    # node's SEG, labels the series
    assert provenance["images"] == len(phantom_files)
    card = load_bundle(builtin_bundle("lesion-seg")).card
    (case,) = load_cases(feedback_root(node.config.node.data_dir), card.labels)
    assert int(case.mask.sum()) == int(corrected.pixel_array.sum())
    # still no job after all this
    assert len(node.jobs.list_jobs()) == 1, describe_jobs(node)


def test_segs_that_correct_nothing_the_node_made_are_not_training_data(
    node_factory: Callable[..., Node],
    folder_scp: FolderSCP,
    phantom_files: list[Path],
    tmp_path: Path,
    require_tool: Callable[[str], str],
) -> None:
    storescu = require_tool("storescu")
    node, study_uid, node_seg = processed_study(node_factory, folder_scp, phantom_files)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in phantom_files]
    # Given three SEGs: the node's own coming back, the node's re-saved under new UIDs,
    # and a correction that names another series
    own = node_seg
    resaved = pydicom.dcmread(node_seg)
    resaved.SOPInstanceUID = resaved.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    resaved.SeriesInstanceUID = generate_uid()
    elsewhere = corrected_segmentation(node_seg, sources)
    elsewhere.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    paths = [own]
    for name, ds in (("resaved.dcm", resaved), ("elsewhere.dcm", elsewhere)):
        paths.append(tmp_path / name)
        ds.save_as(paths[-1], enforce_file_format=True)
    # When they are sent to the node
    proc = run_storescu(storescu, node.port, paths, calling_ae=RADIOLOGIST_AE)
    assert proc.returncode == 0, proc.stderr
    for ds in (resaved, elsewhere):
        wait_until(lambda ds=ds: node.index.instance_versions(ds.SOPInstanceUID), 30, "the SEG")
    # Then the node's own SEG is not even noted, and the others are rejected with why (the
    # running node settles them; a collection run meanwhile settles what is left)
    collector = FeedbackCollector(node.index.db, node.jobs)
    collector.collect()
    inbox = FeedbackInbox(node.index.db)
    settled = {r.sop_instance_uid: r for r in inbox.records()}
    assert set(settled) == {resaved.SOPInstanceUID, elsewhere.SOPInstanceUID}
    assert settled[resaved.SOPInstanceUID].state == FeedbackState.REJECTED
    assert "made by a dicomnode" in settled[resaved.SOPInstanceUID].reason
    assert settled[elsewhere.SOPInstanceUID].state == FeedbackState.REJECTED
    assert "references no series the node processed" in settled[elsewhere.SOPInstanceUID].reason
    assert not feedback_root(node.config.node.data_dir).exists()
    # and a second collection finds nothing left to settle
    assert collector.collect() == []
    assert len(node.jobs.list_jobs()) == 1, describe_jobs(node)
    del study_uid


@pytest.mark.parametrize("state", ["accepted", "rejected"])
def test_a_settled_note_cannot_be_settled_again(tmp_path: Path, state: str) -> None:
    from dicomnode.db import Database
    from dicomnode.errors import TransitionError
    from dicomnode.spool.feedback import FeedbackInbox
    from dicomnode.spool.index import InstanceHeader

    inbox = FeedbackInbox(Database(tmp_path))
    header = InstanceHeader("1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.4", "1.2.3", "1.2.3.5", "1.2")
    assert inbox.note(header, calling_ae="A", calling_host="h")
    assert not inbox.note(header, calling_ae="A", calling_host="h")  # a second copy
    (note,) = inbox.records()
    inbox.settle(note.id, FeedbackState(state))
    with pytest.raises(TransitionError):
        inbox.settle(note.id, FeedbackState.ACCEPTED)


def test_the_study_page_shows_the_corrections_sent_back(
    node_factory: Callable[..., Node],
    folder_scp: FolderSCP,
    phantom_files: list[Path],
    tmp_path: Path,
    require_tool: Callable[[str], str],
) -> None:
    storescu = require_tool("storescu")
    base = node_factory(start=False, pacs_port=folder_scp.port).config
    node = Node(dataclasses.replace(base, http=HttpSettings(enabled=True, port=0)))
    node.start()
    try:
        results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
        assert all(r.ok for r in results)
        wait_until(lambda: [j.state for j in node.jobs.list_jobs()] == ["done"], 120, "the job")
        (job,) = node.jobs.list_jobs()
        (node_seg,) = node.config.node.data_dir.glob(f"results/job-{job.id}/*-seg.dcm")
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in phantom_files]
        path = tmp_path / "corrected.dcm"
        corrected_segmentation(node_seg, sources).save_as(path, enforce_file_format=True)
        assert run_storescu(storescu, node.port, [path], calling_ae=RADIOLOGIST_AE).returncode == 0
        study = f"/studies/{job.study_instance_uid}"
        # noted as it arrived, settled by the collector: the page says both
        wait_until(lambda: "not yet settled" in page(node, study), 30, "the note on the page")
        FeedbackCollector(node.index.db, node.jobs).collect()
        shown = page(node, study)
        assert "Corrections sent back" in shown and f"{RADIOLOGIST_AE}@127.0.0.1" in shown
        assert "accepted" in shown and f"job {job.id}:" in shown and "Example Viewer" in shown
    finally:
        node.stop(timeout=30)


def test_a_note_settled_meanwhile_by_another_collector_is_skipped(tmp_path: Path) -> None:
    """The node's housekeeping and `dicomnode feedback list` may settle at the same time:
    the one that comes second skips the note instead of failing."""
    from dicomnode.config import RetrySettings
    from dicomnode.db import Database
    from dicomnode.jobs.store import JobStore
    from dicomnode.spool.index import InstanceHeader

    db = Database(tmp_path)
    inbox = FeedbackInbox(db)
    header = InstanceHeader("1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.4", "1.2.3", "1.2.3.5", "1.2")
    inbox.note(header, calling_ae="A", calling_host="h")
    stale = inbox.records()  # what the second collector read ...
    first, second = (FeedbackCollector(db, JobStore(db, RetrySettings())) for _ in range(2))
    assert [r.state for r in first.collect()] == [FeedbackState.REJECTED]  # ... before this
    second.inbox.records = lambda *args, **kwargs: stale  # type: ignore[method-assign]
    assert second.collect() == []
    assert [r.state for r in inbox.records()] == [FeedbackState.REJECTED]
