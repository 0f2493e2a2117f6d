"""Query/Retrieve SCP with real peers: dcmtk findscu, movescu, getscu; Orthanc; pynetdicom.

Given a node that received the CT phantom and made its SEG and SR (the job waits in
``sending``: its PACS is down), when peers query and retrieve, then the received study and
the node's own results are found with the standard's matching, retrieved to a remote or on
the same association, bad queries get failure statuses, and every request is audited
without patient data.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.app.node import Node
from dicomnode.audit import read_audit
from dicomnode.config import AllowedCaller, Remote
from dicomnode.synthetic.phantom import Phantom

from .peers import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    Orthanc,
    StoreSCP,
    describe_jobs,
    peer_environment,
    run_storescu,
    wait_until,
)

pytestmark = pytest.mark.peer

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Held:
    """A node holding the phantom study and its own SEG and SR."""

    node: Node
    study_uid: str
    series_uid: str
    ct_uids: list[str]
    move_folder: Path
    move_port: int
    tool: Callable[[str], str]


@pytest.fixture
def held(
    node_factory: Callable[..., Node],
    phantom_files: list[Path],
    phantom: Phantom,
    free_port: Callable[[], int],
    require_tool: Callable[[str], str],
    tmp_path: Path,
) -> Iterator[Held]:
    move_port = free_port()
    storescp = StoreSCP(require_tool("storescp"), move_port, tmp_path / "moved", "MOVEDEST")
    storescp.start()
    node = node_factory(remotes=[Remote("movedest", "MOVEDEST", "127.0.0.1", move_port, 10.0)])
    sent = run_storescu(require_tool("storescu"), node.port, phantom_files)
    assert sent.returncode == 0, sent.stderr
    wait_until(
        lambda: [j.state for j in node.jobs.list_jobs()] == ["sending"],
        120,
        f"SEG and SR made; jobs {describe_jobs(node)}",
        0.2,
    )
    first = dcmread(phantom_files[0], stop_before_pixels=True)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom_files]
    yield Held(
        node,
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        uids,
        tmp_path / "moved",
        move_port,
        require_tool,
    )
    storescp.stop()


def findscu(
    held: Held, folder: Path, model: str, keys: list[str], *, calling_ae: str = "FINDSCU"
) -> list[Dataset]:
    """dcmtk findscu; the responses it extracted, read back."""
    folder.mkdir(parents=True)
    args = [a for k in keys for a in ("-k", k)]
    done = subprocess.run(
        [
            held.tool("findscu"), "-aet", calling_ae, "-aec", "DICOMNODE", model, *args,
            "-X", "-od", str(folder), "127.0.0.1", str(held.node.port),
        ],
        capture_output=True, text=True, timeout=60, env=peer_environment(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def test_findscu_matches_at_every_level_in_both_models(held: Held, tmp_path: Path) -> None:
    # Given the node holding the phantom and its results; When findscu asks
    study = findscu(
        held, tmp_path / "f1", "-S",
        ["QueryRetrieveLevel=STUDY", "PatientName=PH*", "StudyDate=20240101-20241231",
         "StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
         "PatientID"],
    )  # fmt: skip
    # Then one study, with the CT and the node's own SEG and SR in it
    assert [str(d.StudyInstanceUID) for d in study] == [held.study_uid]
    assert set(study[0].ModalitiesInStudy) == {"CT", "SEG", "SR"}
    assert int(study[0].NumberOfStudyRelatedInstances) == len(held.ct_uids) + 2
    assert study[0].PatientID == "PH0001"

    outside = findscu(
        held, tmp_path / "f2", "-S", ["QueryRetrieveLevel=STUDY", "StudyDate=20250101-"]
    )
    assert outside == []

    patients = findscu(
        held, tmp_path / "f3", "-P",
        ["QueryRetrieveLevel=PATIENT", "PatientID=PH0001", "PatientName",
         "NumberOfPatientRelatedStudies"],
    )  # fmt: skip
    assert [str(p.PatientName) for p in patients] == ["PHANTOM^SYNTHETIC"]
    assert int(patients[0].NumberOfPatientRelatedStudies) == 1

    listed = findscu(
        held, tmp_path / "f4", "-S",
        ["QueryRetrieveLevel=STUDY", "ModalitiesInStudy=MR\\SEG", "StudyInstanceUID"],
    )  # fmt: skip
    assert [str(d.StudyInstanceUID) for d in listed] == [held.study_uid]

    series = findscu(
        held, tmp_path / "f5", "-S",
        ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={held.study_uid}", "Modality",
         "SeriesInstanceUID", "PerformedProcedureStepStatus",
         "PerformedProcedureStepDescription", "NumberOfSeriesRelatedInstances"],
    )  # fmt: skip
    by_modality = {str(s.Modality): s for s in series}
    assert set(by_modality) == {"CT", "SEG", "SR"}
    assert int(by_modality["CT"].NumberOfSeriesRelatedInstances) == len(held.ct_uids)
    assert by_modality["CT"].PerformedProcedureStepStatus in ("", None)
    for own in ("SEG", "SR"):  # the node's results, with the state of their job
        assert by_modality[own].PerformedProcedureStepStatus == "IN PROGRESS"
        assert by_modality[own].PerformedProcedureStepDescription.endswith(": sending")

    wanted = held.ct_uids[:3]
    images = findscu(
        held, tmp_path / "f6", "-P",
        ["QueryRetrieveLevel=IMAGE", "PatientID=PH0001", f"StudyInstanceUID={held.study_uid}",
         f"SeriesInstanceUID={held.series_uid}", "SOPInstanceUID=" + "\\".join(wanted),
         "InstanceNumber", "SOPClassUID"],
    )  # fmt: skip
    assert sorted(str(i.SOPInstanceUID) for i in images) == sorted(wanted)
    assert {str(i.SOPClassUID) for i in images} == {CT_CLASS}

    own = findscu(
        held, tmp_path / "f7", "-S",
        ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={held.study_uid}",
         f"SOPClassUID={SEG_CLASS}\\{COMPREHENSIVE_3D_SR_CLASS}", "SOPInstanceUID",
         "PerformedProcedureStepStatus"],
    )  # fmt: skip
    assert len(own) == 2 and {o.PerformedProcedureStepStatus for o in own} == {"IN PROGRESS"}

    # And every query is audited with its caller, level and count, never a patient's data
    audit = [r for r in read_audit(held.node.config.node.audit_path) if r["event"] == "query"]
    assert len(audit) == 7
    assert audit[0]["level"] == "STUDY" and audit[0]["matches"] == 1
    assert audit[0]["calling_ae"] == "FINDSCU" and "PatientName" in audit[0]["keys"]
    text = held.node.config.node.audit_path.read_text()
    assert "PHANTOM" not in text and "PH0001" not in text and "PH*" not in text


def test_movescu_and_getscu_retrieve_the_study(held: Held, tmp_path: Path) -> None:
    # When movescu asks the node to move the study to a configured remote
    moved = subprocess.run(
        [
            held.tool("movescu"), "-aet", "MOVESCU", "-aec", "DICOMNODE", "-aem", "MOVEDEST", "-S",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={held.study_uid}",
            "127.0.0.1", str(held.node.port),
        ],
        capture_output=True, text=True, timeout=120, env=peer_environment(), check=False,
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    # Then the remote has every CT image and the SEG and SR
    files = sorted(held.move_folder.iterdir())
    assert len(files) == len(held.ct_uids) + 2
    assert {str(dcmread(f, stop_before_pixels=True).Modality) for f in files} == {
        "CT", "SEG", "SR"
    }  # fmt: skip

    # When getscu gets one series into a folder on the same association
    out = tmp_path / "got"
    out.mkdir()
    got = subprocess.run(
        [
            held.tool("getscu"), "-aet", "GETSCU", "-aec", "DICOMNODE", "-S",
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={held.study_uid}",
            "-k", f"SeriesInstanceUID={held.series_uid}", "-od", str(out),
            "127.0.0.1", str(held.node.port),
        ],
        capture_output=True, text=True, timeout=120, env=peer_environment(), check=False,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
    assert received == set(held.ct_uids)

    # When a move names a destination the node does not know: 0xA801
    assoc = _associate(held.node.port, StudyRootQueryRetrieveInformationModelMove)
    identifier = _identifier("STUDY", StudyInstanceUID=held.study_uid)
    statuses = [
        int(s.Status)
        for s, _ in assoc.send_c_move(
            identifier, "NOWHERE", StudyRootQueryRetrieveInformationModelMove
        )
    ]
    assoc.release()
    assert statuses[-1] == 0xA801

    audit = [r for r in read_audit(held.node.config.node.audit_path) if r["event"] == "retrieve"]
    assert [(r["operation"], r.get("instances")) for r in audit] == [
        ("C-MOVE", len(held.ct_uids) + 2),
        ("C-GET", len(held.ct_uids)),
        ("C-MOVE", None),
    ]
    assert audit[2]["status"] == 0xA801 and audit[2]["destination"] == "NOWHERE"


def _associate(port: int, *contexts: Any, calling_ae: str = "QRSCU") -> Any:
    ae = AE(ae_title=calling_ae)
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def _identifier(level: str | None, **keys: str) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _find(assoc: Any, identifier: Dataset, model: Any) -> tuple[int, int]:
    """(final status, number of pending responses)."""
    pending, final = 0, -1
    for status, _ in assoc.send_c_find(identifier, model):
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            pending += 1
        else:
            final = code
    return final, pending


def test_bad_queries_fail_with_a_status_and_the_association_stays_usable(held: Held) -> None:
    # Given one association; When it sends bad queries between good ones
    assoc = _associate(
        held.node.port,
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
    )
    study_root = StudyRootQueryRetrieveInformationModelFind
    asked = [
        (_identifier("FRAME", StudyInstanceUID=""), study_root),
        (_identifier(None, StudyInstanceUID=""), study_root),
        (_identifier("PATIENT", PatientID=""), study_root),
        (_identifier("STUDY", StudyInstanceUID="1.2.abc"), study_root),
        (_identifier("SERIES", StudyInstanceUID=held.study_uid), study_root),
        (_identifier("STUDY", StudyDate="2024-01-01"), study_root),
        (_identifier("STUDY", StudyInstanceUID=held.study_uid), study_root),
    ]
    asked[4][0][0x00200011] = RawDataElement(  # a range on an IS key
        Tag(0x00200011), "IS", 4, b"1-5 ", 0, True, True
    )
    answers = [_find(assoc, ds, model) for ds, model in asked]
    assoc.release()
    # Then each bad one fails with the standard's status, and the good one still works
    assert [a[0] for a in answers] == [0xA900, 0xA900, 0xA900, 0xC000, 0xC000, 0xC000, 0x0000]
    assert answers[-1][1] == 1
    audit = [r for r in read_audit(held.node.config.node.audit_path) if r["event"] == "query"]
    assert [r["status"] for r in audit] == [0xA900, 0xA900, 0xA900, 0xC000, 0xC000, 0xC000, 0]


def test_a_caller_not_allowed_cannot_query(
    node_factory: Callable[..., Node], tmp_path: Path
) -> None:
    # Given a node that allows only PACS
    node = node_factory(start=False)
    from dataclasses import replace

    config = replace(
        node.config, node=replace(node.config.node, allowed_callers=(AllowedCaller("PACS"),))
    )
    allowed = Node(config)
    allowed.start()
    try:
        # When another AE asks; Then the association is rejected
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", allowed.port, ae_title="DICOMNODE")
        assert assoc.is_rejected
        # And PACS may
        ok = _associate(allowed.port, StudyRootQueryRetrieveInformationModelFind, calling_ae="PACS")
        assert _find(
            ok,
            _identifier("STUDY", StudyInstanceUID=""),
            StudyRootQueryRetrieveInformationModelFind,
        ) == (0, 0)
        ok.release()
    finally:
        allowed.stop(timeout=30.0)


def test_orthanc_queries_and_retrieves_from_the_node(
    held: Held, free_port: Callable[[], int], tmp_path: Path
) -> None:
    # Given Orthanc with the node as a modality, and the node with Orthanc as a remote
    orthanc_port, http_port = free_port(), free_port()
    orthanc = Orthanc(
        held.tool("Orthanc"), tmp_path / "orthanc", orthanc_port, http_port,
        {"node": ["DICOMNODE", "127.0.0.1", held.node.port]},
    )  # fmt: skip
    held.node.scp.qr.remotes += (  # type: ignore[union-attr]
        Remote("orthanc", "ORTHANC", "127.0.0.1", orthanc_port, 10.0),
    )
    orthanc.start()
    try:
        # When Orthanc queries the node for the study and retrieves the answer
        query = orthanc.post_json(
            "/modalities/node/query",
            {"Level": "Study", "Query": {"StudyInstanceUID": held.study_uid}},
        )
        answers = orthanc.get(f"/queries/{query['ID']}/answers")
        assert len(answers) == 1
        orthanc.post_json(
            f"/queries/{query['ID']}/answers/0/retrieve",
            {"TargetAet": "ORTHANC", "Synchronous": True},
        )
        # Then Orthanc holds the study: the CT images and the node's SEG and SR
        studies = orthanc.post_json(
            "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": held.study_uid}}
        )
        assert len(studies) == 1
        stats = orthanc.get(f"/studies/{studies[0]}/statistics")
        assert int(stats["CountInstances"]) == len(held.ct_uids) + 2
    finally:
        orthanc.stop()
