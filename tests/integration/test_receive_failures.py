"""What the SCP refuses, and that refusing breaks nothing; the duplicate policy.

Malformed datasets, a C-STORE request that disagrees with its dataset, an unknown SOP class
and a full disk each get a DICOM failure (never 0x0000), leave nothing in the spool, and the
node keeps accepting the next valid study.  The same instance sent twice is acknowledged
twice and stored once; the same SOP Instance UID with other bytes is kept as version 2.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE

from dicomnode.app.node import Node
from dicomnode.net import status
from dicomnode.net.scu import Peer, echo, send_files
from dicomnode.synthetic.phantom import Phantom

from .peers import dataset_offset, send_raw, write_raw_instance

NodeFactory = Callable[..., Node]
PRIVATE_SOP_CLASS = "1.3.6.1.4.1.5962.99.1.2.3.4"


def _send(node: Node, files: list[Path], calling_ae: str = "MODALITY") -> list[int | None]:
    return [
        r.status for r in send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, calling_ae)
    ]


def _spooled(node: Node) -> list[Path]:
    return sorted(p for p in node.spool.root.rglob("*") if p.is_file())


def _assert_still_serving(node: Node, files: list[Path], phantom: Phantom) -> None:
    """The node answers C-ECHO and stores a whole valid study."""
    assert echo(Peer("DICOMNODE", "127.0.0.1", node.port), "MODALITY") == status.SUCCESS
    assert _send(node, files) == [status.SUCCESS] * len(files)
    rows = node.index.latest_instances(str(phantom.datasets[0].StudyInstanceUID))
    assert len(rows) == len(files)


def _body(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file (what goes on the wire)."""
    return path.read_bytes()[dataset_offset(path) :]


@pytest.fixture
def node(node_factory: NodeFactory) -> Node:
    return node_factory(quiet_period_s=3600.0, pacs_port=9)


@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")
@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated-header", "truncated-pixel-data", "truncated-encapsulated"],
)
def test_malformed_dataset_gets_a_failure_status(
    damage: str,
    node: Node,
    phantom: Phantom,
    phantom_files: list[Path],
    tmp_path: Path,
) -> None:
    # Given a C-STORE whose dataset bytes are damaged
    body, syntax = _body(phantom_files[0]), ExplicitVRLittleEndian
    if damage == "truncated-encapsulated":
        ds = dcmread(phantom_files[0])
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
        body, syntax = _body(tmp_path / "rle.dcm"), RLELossless
    if damage == "garbage":
        damaged = random.Random(7).randbytes(4096)
    elif damage == "truncated-header":
        damaged = body[:300]
    else:  # cut inside the last fragment / the native pixel data
        damaged = body[: len(body) - 2000]
    raw = write_raw_instance(
        tmp_path / "damaged.dcm",
        damaged,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=str(phantom.datasets[0].SOPInstanceUID),
        transfer_syntax_uid=syntax,
    )

    # When it is sent on a raw association
    code = send_raw(node.port, raw, [(CTImageStorage, syntax)])

    # Then the node answers "cannot understand" and keeps nothing
    assert code == status.ERROR_CANNOT_UNDERSTAND, f"0x{code or 0:04X}"
    assert _spooled(node) == []
    assert node.index.instance_versions(str(phantom.datasets[0].SOPInstanceUID)) == []
    assert node.scp.counters.failed == 1
    # And the next valid study is accepted
    _assert_still_serving(node, phantom_files, phantom)


def test_dataset_that_contradicts_the_request_is_refused(
    node: Node, phantom: Phantom, phantom_files: list[Path], tmp_path: Path
) -> None:
    body = _body(phantom_files[0])
    # Given a request whose Affected SOP Instance UID is not the dataset's
    other_uid = write_raw_instance(
        tmp_path / "other-uid.dcm",
        body,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=generate_uid(),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # and one whose Affected SOP Class UID (MR) is not the dataset's (CT)
    other_class = write_raw_instance(
        tmp_path / "other-class.dcm",
        body,
        sop_class_uid=MRImageStorage,
        sop_instance_uid=str(phantom.datasets[0].SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    contexts = [(CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ExplicitVRLittleEndian)]

    # When they are sent
    codes = [send_raw(node.port, p, contexts) for p in (other_uid, other_class)]

    # Then both get a failure status and nothing is stored
    assert codes == [status.ERROR_CANNOT_UNDERSTAND, status.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS]
    assert _spooled(node) == []
    _assert_still_serving(node, phantom_files, phantom)


def test_unknown_sop_class_is_not_accepted(
    node: Node, phantom: Phantom, phantom_files: list[Path], tmp_path: Path
) -> None:
    # Given an instance of a private SOP class the node does not know
    ds = dcmread(phantom_files[0])
    ds.SOPClassUID = PRIVATE_SOP_CLASS
    ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
    private = tmp_path / "private.dcm"
    ds.save_as(private, enforce_file_format=True)

    # When a peer proposes that SOP class
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        # Then its presentation context is rejected, so it cannot be sent at all
        assert PRIVATE_SOP_CLASS in rejected and PRIVATE_SOP_CLASS not in accepted
        assert CTImageStorage in accepted
        with pytest.raises(ValueError):
            assoc.send_c_store(ds)
    finally:
        assoc.release()

    # And sent under the CT context instead, it gets a failure status
    raw = write_raw_instance(
        tmp_path / "private-as-ct.dcm",
        _body(private),
        sop_class_uid=CTImageStorage,
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    code = send_raw(node.port, raw, [(CTImageStorage, ExplicitVRLittleEndian)])
    assert code == status.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert _spooled(node) == []
    _assert_still_serving(node, phantom_files, phantom)


def test_below_the_disk_watermark_stores_nothing(
    node_factory: NodeFactory, phantom: Phantom, phantom_files: list[Path]
) -> None:
    # Given a node whose watermark is above the free space of its disk
    node = node_factory(quiet_period_s=3600.0, pacs_port=9, min_free_disk_mb=2**40)

    # When a study is sent
    codes = _send(node, phantom_files[:3])

    # Then every instance is refused as out of resources and nothing is written
    assert codes == [status.REFUSED_OUT_OF_RESOURCES] * 3
    assert _spooled(node) == []
    assert list(node.spool.tmp.iterdir()) == []
    assert node.index.latest_instances(str(phantom.datasets[0].StudyInstanceUID)) == []
    assert node.index.studies() == []


def test_identical_duplicate_is_acknowledged_and_stored_once(
    node: Node, phantom: Phantom, phantom_files: list[Path]
) -> None:
    uid = str(phantom.datasets[0].SOPInstanceUID)
    # Given an instance already received
    assert _send(node, phantom_files[:1]) == [status.SUCCESS]

    # When the same bytes arrive again, on the same and on a new association
    assert _send(node, [phantom_files[0], phantom_files[0]]) == [status.SUCCESS] * 2

    # Then every copy is acknowledged and the instance is stored once
    versions = node.index.instance_versions(uid)
    assert [v.version for v in versions] == [1]
    assert len(_spooled(node)) == 1
    assert node.scp.counters.stored == 1 and node.scp.counters.duplicates == 2


def test_same_uid_with_other_content_is_kept_as_version_2(
    node: Node, phantom: Phantom, phantom_files: list[Path], tmp_path: Path
) -> None:
    uid = str(phantom.datasets[0].SOPInstanceUID)
    assert _send(node, phantom_files[:1]) == [status.SUCCESS]
    # Given the same SOP Instance UID with different content
    ds = dcmread(phantom_files[0])
    ds.SeriesDescription = "CORRECTED"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)

    # When it is sent
    assert _send(node, [changed]) == [status.SUCCESS]

    # Then it is kept as version 2 next to version 1, and version 2 is the one processed
    versions = node.index.instance_versions(uid)
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].path.name == f"{uid}.v2.dcm"
    assert dcmread(versions[1].path).SeriesDescription == "CORRECTED"
    assert dcmread(versions[0].path).SeriesDescription != "CORRECTED"
    study = str(phantom.datasets[0].StudyInstanceUID)
    assert [r.version for r in node.index.latest_instances(study)] == [2]
    assert node.scp.counters.new_versions == 1
