"""Real PACS traffic: results that come back, re-sent studies, untidy studies.

The node's own SEG and SR, and any non-image object, are stored and acknowledged but never
start processing, never count as late arrivals and never make a new generation; a study
re-sent with instances the node holds is a duplicate; one series that cannot be processed
never costs the others their results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from dicomnode.app.node import Node
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.outputs.validate import run_dciodvfy
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom, write_phantom
from dicomnode.uids import UID_ROOT

from .peers import describe_jobs, wait_until

NodeFactory = Callable[..., Node]
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _send(node: Node, files: list[Path], caller: str = "PACS") -> None:
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, caller)
    assert all(r.status == 0 for r in results), [(r.status, r.error) for r in results]


def _settled(node: Node, count: int) -> bool:
    jobs = node.jobs.list_jobs()
    return len(jobs) == count and all(j.state in ("done", "failed") for j in jobs)


def _quiet(node: Node, seconds: float) -> None:
    """Let the scheduler run over several quiet periods (nothing should happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        node.scheduler.tick()
        time.sleep(0.1)


def test_results_sent_back_and_a_resent_study_make_no_new_generation(
    node_factory: NodeFactory, folder_scp: FolderSCP, phantom: Phantom, phantom_files: list[Path]
) -> None:
    # Given a node that processed a study and delivered its SEG and SR
    node = node_factory(quiet_period_s=0.5, pacs_port=folder_scp.port)
    _send(node, phantom_files)
    wait_until(lambda: _settled(node, 1), 60, f"first job; {describe_jobs(node)}")
    returned = folder_scp.wait_for(2, 30)
    assert {str(dcmread(p).SOPClassUID) for p in returned} == {SEG_CLASS, SR_CLASS}
    assert all(str(dcmread(p).SOPInstanceUID).startswith(UID_ROOT) for p in returned)
    study_uid = str(phantom.datasets[0].StudyInstanceUID)

    # When the PACS forwards the whole study back: its images and the node's own results
    _send(node, [*phantom_files, *returned], caller="ORTHANC")
    _quiet(node, 2.0)

    # Then the results are stored (acknowledged, indexed) but drive nothing
    stored = node.index.latest_instances(study_uid)
    own = [i for i in stored if i.sop_class_uid in (SEG_CLASS, SR_CLASS)]
    assert len(own) == 2 and not any(i.drives for i in own)
    assert len(stored) == len(phantom_files) + 2  # the images were duplicates
    record = node.index.study(study_uid)
    assert record is not None and record.state == "complete" and record.generation == 1
    assert len(node.jobs.list_jobs()) == 1
    assert len(folder_scp.received) == 2


def test_an_sr_in_the_ct_series_is_left_out_and_alone_starts_nothing(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom: Phantom,
    phantom_files: list[Path],
    tmp_path: Path,
) -> None:
    node = node_factory(quiet_period_s=0.5, pacs_port=folder_scp.port)
    # Given the node's own SR of this study, first as the only object of the study
    _send(node, phantom_files)
    wait_until(lambda: _settled(node, 1), 60, f"first job; {describe_jobs(node)}")
    sr = next(p for p in folder_scp.wait_for(2, 30) if dcmread(p).SOPClassUID == SR_CLASS)
    other = node_factory(quiet_period_s=0.5, pacs_port=folder_scp.port, data_dir=tmp_path / "b")
    _send(other, [sr])
    _quiet(other, 1.5)
    (record,) = other.index.studies()
    assert record.state == "ignored" and other.jobs.list_jobs() == []

    # When a foreign SR that shares the CT's Series Instance UID arrives with the images
    foreign = dcmread(sr)
    foreign.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    foreign.file_meta.MediaStorageSOPInstanceUID = foreign.SOPInstanceUID
    foreign.SeriesInstanceUID = phantom.datasets[0].SeriesInstanceUID
    foreign_path = tmp_path / "foreign-sr.dcm"
    foreign.save_as(foreign_path)
    _send(other, [*phantom_files, foreign_path])

    # Then the study is processed over the images only
    wait_until(lambda: _settled(other, 1), 60, f"job; {describe_jobs(other)}")
    (job,) = other.jobs.list_jobs()
    assert job.state == "done", job.last_error
    (series,) = json.loads(job.summary)["series"]
    assert series["slices"] == len(phantom_files)


def test_a_new_image_in_the_routed_series_still_makes_a_new_generation(
    node_factory: NodeFactory, folder_scp: FolderSCP, phantom_files: list[Path]
) -> None:
    node = node_factory(quiet_period_s=0.5, pacs_port=folder_scp.port)
    _send(node, phantom_files[:-1])
    wait_until(lambda: _settled(node, 1), 60, f"first job; {describe_jobs(node)}")
    _send(node, phantom_files[:-1])  # the same images again: nothing
    _quiet(node, 1.5)
    assert len(node.jobs.list_jobs()) == 1
    _send(node, phantom_files[-1:])  # a new image: generation 2
    wait_until(lambda: _settled(node, 2), 60, f"second job; {describe_jobs(node)}")
    assert sorted(j.generation for j in node.jobs.list_jobs()) == [1, 2]


def _undecodable_series(folder: Path, study_uid: str) -> list[Path]:
    """A CT series of the study whose RLE frames cannot be decoded."""
    spec = PhantomSpec(
        rows=64,
        columns=64,
        slices=6,
        pixel_spacing=(5.0, 5.0),
        lesions=(),
        transfer_syntax=RLELossless,
        study_instance_uid=study_uid,
        series_number=2,
        series_description="BROKEN AXIAL",
    )
    files = write_phantom(generate_phantom(spec), folder)
    for path in files:
        ds = dcmread(path)
        ds.PixelData = encapsulate([b"\x01\x00\x00\x00\x40\x00\x00\x00" + bytes(56) + b"\x80" * 40])
        ds.save_as(path)
    return files


def _mr_series(folder: Path, study_uid: str) -> list[Path]:
    spec = PhantomSpec(
        rows=32, columns=32, slices=4, lesions=(), study_instance_uid=study_uid, series_number=3
    )
    files = write_phantom(generate_phantom(spec), folder)
    for path in files:
        ds = dcmread(path)
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.save_as(path)
    return files


@pytest.mark.peer
def test_one_bad_series_never_sinks_the_others(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom: Phantom,
    phantom_files: list[Path],
    tmp_path: Path,
    require_tool: Callable[[str], str],
) -> None:
    require_tool("dciodvfy")
    # Given a study with a good CT series, a routed CT series that cannot be decoded and
    # an MR series that no route wants
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    broken = _undecodable_series(tmp_path / "broken", study_uid)
    mr = _mr_series(tmp_path / "mr", study_uid)
    node = node_factory(
        quiet_period_s=0.5,
        pacs_port=folder_scp.port,
        match=[{"Modality": "CT", "instance_count": {"ge": 5}}],
    )
    # When it is received
    _send(node, [*phantom_files, *broken, *mr])
    wait_until(lambda: _settled(node, 1), 90, f"job; {describe_jobs(node)}")

    # Then the good series' SEG and SR are delivered and clean
    (job,) = node.jobs.list_jobs()
    assert job.state == "done", job.last_error
    delivered = folder_scp.wait_for(2, 30)
    assert len(delivered) == 2
    for path in delivered:
        assert run_dciodvfy(path).ok, path
    # and the broken series is reported in the job, naming the series and the cause
    summary = json.loads(job.summary)
    good = str(phantom.datasets[0].SeriesInstanceUID)
    bad = str(dcmread(broken[0]).SeriesInstanceUID)
    assert [s["series"] for s in summary["series"]] == [good]
    (failure,) = summary["failed"]
    assert failure["series"] == bad and "cannot decode pixel data" in failure["error"]
    assert "1 series not processed" in job.last_error and bad in job.last_error
    audit = [json.loads(line) for line in node.config.node.audit_path.read_text().splitlines()]
    assert any(r["event"] == "series" and r.get("series_instance_uid") == bad for r in audit)
    # and the MR series was never part of the job
    mr_series = str(dcmread(mr[0]).SeriesInstanceUID)
    assert mr_series not in job.series_uids and bad in job.series_uids


def _with_localizers(files: list[Path], folder: Path, count: int = 2) -> list[Path]:
    """Copies of the first slice turned into coronal localizers of the same series."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(count):
        ds = dcmread(files[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.999.{n + 1}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.InstanceNumber = 900 + n
        path = folder / f"zz-localizer-{n}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def test_localizers_in_the_axial_series_are_left_out_and_recorded(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom_files: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dicomnode.cli import main

    localizers = _with_localizers(phantom_files, tmp_path / "loc")
    # Given an axial series with two localizer images in it
    node = node_factory(quiet_period_s=0.5, pacs_port=folder_scp.port)
    _send(node, [*phantom_files, *localizers])
    wait_until(lambda: _settled(node, 1), 60, f"job; {describe_jobs(node)}")
    # Then the axial stack is processed and the choice is recorded in the job
    (job,) = node.jobs.list_jobs()
    assert job.state == "done", job.last_error
    (series,) = json.loads(job.summary)["series"]
    assert series["slices"] == len(phantom_files)
    assert series["left_out"] == {"localizer": 2}
    assert "2 of" in series["stack"] and "left out" in series["stack"]
    # and `route explain` says the same before anything is sent
    study = tmp_path / "explain-study"
    study.mkdir()
    for p in [*phantom_files, *localizers]:
        (study / p.name).write_bytes(p.read_bytes())
    config = tmp_path / "explain.toml"
    config.write_text(
        '[[pipelines]]\nname = "lesion"\nbundles.segmentation = "builtin:lesion-seg"\n'
        '[[routes]]\nname = "ct"\npipeline = "lesion"\ndestinations = ["@sender"]\n'
        '[[routes.match]]\nModality = "CT"\n'
    )
    assert main(["route", "explain", str(study), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and "2 localizer" in out and "left out" in out
