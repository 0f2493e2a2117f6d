"""Orthanc as the PACS: it auto-routes a study to the node and gets the SEG + SR back.

Orthanc runs on free DICOM and HTTP ports in a temporary folder, knows the node as the
modality ``dicomnode``, and is known to the node as the remote ``ORTHANC``; the route sends
results to ``@sender``, i.e. back to the AE that sent the study.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from dicomnode.app.node import Node
from dicomnode.outputs.validate import run_dciodvfy, run_dsrdump
from dicomnode.synthetic.phantom import Phantom

from .peers import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    Orthanc,
    describe_jobs,
    orthanc_with_node,
    wait_until,
)

pytestmark = pytest.mark.peer


@pytest.fixture
def orthanc_node(
    tmp_path: Path,
    free_port: Callable[[], int],
    node_factory: Callable[..., Node],
    require_tool: Callable[[str], str],
) -> Iterator[tuple[Orthanc, Node]]:
    with orthanc_with_node(
        require_tool("Orthanc"), tmp_path / "orthanc", free_port, node_factory
    ) as pair:
        yield pair


def test_orthanc_routes_study_and_stores_seg_and_sr(
    orthanc_node: tuple[Orthanc, Node],
    phantom: Phantom,
    phantom_files: list[Path],
    require_tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    require_tool("dciodvfy")
    require_tool("dsrdump")
    orthanc, node = orthanc_node
    # Given the study stored in Orthanc
    uploaded = [orthanc.upload(f) for f in phantom_files]
    study_ids = {u["ParentStudy"] for u in uploaded}
    assert len(study_ids) == 1
    study_id = study_ids.pop()

    # When Orthanc sends it to the node (as an auto-routing rule would)
    answer = orthanc.post_json(
        "/modalities/dicomnode/store", {"Resources": [study_id], "Synchronous": True}
    )
    assert int(answer.get("InstancesCount", len(phantom_files))) == len(phantom_files), answer
    assert int(answer.get("FailedInstancesCount", 0)) == 0, answer

    # Then the node received every instance from ORTHANC...
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    rows = node.index.latest_instances(study_uid)
    assert len(rows) == len(phantom_files)
    assert {r.calling_ae for r in rows} == {"ORTHANC"}

    # ...and the SEG and the SR end up stored in Orthanc, in the same study
    def results() -> tuple[list[str], list[str]] | None:
        found = (
            orthanc.find_instances(SEG_CLASS),
            orthanc.find_instances(COMPREHENSIVE_3D_SR_CLASS),
        )
        return found if all(found) else None

    segs, srs = wait_until(results, 60, f"SEG and SR in Orthanc; jobs {describe_jobs(node)}", 0.2)
    assert len(segs) == 1 and len(srs) == 1
    assert len(orthanc.get(f"/studies/{study_id}/instances")) == len(phantom_files) + 2
    wait_until(lambda: [j.state for j in node.jobs.list_jobs()] == ["done"], 20, "job done")

    # ...readable by highdicom and clean for dciodvfy (and dsrdump for the SR)
    seg_path = tmp_path / "seg.dcm"
    sr_path = tmp_path / "sr.dcm"
    seg_path.write_bytes(orthanc.request("GET", f"/instances/{segs[0]}/file"))
    sr_path.write_bytes(orthanc.request("GET", f"/instances/{srs[0]}/file"))
    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    assert isinstance(seg, hd.seg.Segmentation)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == str(
        phantom.datasets[0].SeriesInstanceUID
    )
    assert dcmread(sr_path).ContentTemplateSequence[0].TemplateIdentifier == "1500"
    for path in (seg_path, sr_path):
        report = run_dciodvfy(path)
        assert report.errors == [], report.output
    dump = run_dsrdump(sr_path)
    assert dump.errors == [], dump.output


FORWARD_EVERY_STABLE_STUDY = """
function OnStableStudy(studyId, tags, metadata)
  print('forwarding stable study ' .. studyId .. ' to dicomnode')
  RestApiPost('/modalities/dicomnode/store', studyId)
end
"""


def test_a_pacs_forwarding_every_stable_study_gets_one_seg_and_one_sr(
    tmp_path: Path,
    free_port: Callable[[], int],
    node_factory: Callable[..., Node],
    require_tool: Callable[[str], str],
    phantom: Phantom,
    phantom_files: list[Path],
) -> None:
    """The loop of issue 8: Orthanc forwards every stable study, the node's results
    included, back to the node.  Before the fix the PACS grew from 1 to 28 series in
    150 s, a new series about every 5 s.  From the results' first return to the node and
    for 30 s after it, the PACS must hold exactly one SEG and one SR and the node exactly
    one job."""
    with orthanc_with_node(
        require_tool("Orthanc"),
        tmp_path / "orthanc",
        free_port,
        node_factory,
        lua=FORWARD_EVERY_STABLE_STUDY,
        stable_age_s=2,
        quiet_period_s=1.0,
    ) as (orthanc, node):
        # Given the study stored in Orthanc, which forwards it once it is stable
        for f in phantom_files:
            orthanc.upload(f)

        def counts() -> tuple[int, int]:
            return (
                len(orthanc.find_instances(SEG_CLASS)),
                len(orthanc.find_instances(COMPREHENSIVE_3D_SR_CLASS)),
            )

        wait_until(lambda: counts() == (1, 1), 90, f"results; {describe_jobs(node)}", 0.5)
        # When Orthanc forwards the study again with the results in it (it is stable again
        # once they arrived), and 30 s more pass
        forwarded = orthanc.log.read_text
        wait_until(lambda: forwarded().count("forwarding stable study") >= 2, 60, "a forward")
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            assert counts() in ((1, 1),), counts()
            time.sleep(2.0)
        # Then the PACS holds one SEG and one SR, the node made one job of generation 1,
        # and the node did receive the forwarded results (the rule really fired)
        assert counts() == (1, 1)
        jobs = node.jobs.list_jobs()
        assert [(j.generation, j.state) for j in jobs] == [(1, "done")], describe_jobs(node)
        study_uid = str(phantom.datasets[0].StudyInstanceUID)
        stored = node.index.latest_instances(study_uid)
        own = [i for i in stored if i.sop_class_uid in (SEG_CLASS, COMPREHENSIVE_3D_SR_CLASS)]
        assert len(own) == 2, "Orthanc never forwarded the results back"
        assert orthanc.log.read_text().count("forwarding stable study") >= 2
        assert len(orthanc.get("/series")) == 3  # CT, SEG, SR
