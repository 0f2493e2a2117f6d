"""The receive fast path (net/ul.py): which associations it serves, and that it serves
them as pynetdicom would, with the node's policies, from real peers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicomnode.net import status, ul
from dicomnode.net.scu import Peer, send_files
from dicomnode.spool import journal
from dicomnode.spool.structure import split_file_meta

from ..conftest import require_tool
from .conftest import ScpFactory

TCP_NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def _request(
    contexts: list[tuple[str, list[str]]], *, role: bool = False, called: str = "ANY-SCP"
) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom's requestor encodes it."""
    ae = AE("PEER")
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    captured: list[bytes] = []

    def keep(event: evt.Event) -> None:
        captured.append(event.data)

    handlers: list[Any] = [(evt.EVT_DATA_SENT, keep)]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    ae.acse_timeout = ae.network_timeout = 0.5
    ext: list[Any] = []
    if role:
        from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

        item = SCP_SCU_RoleSelectionNegotiation()
        item.sop_class_uid = contexts[0][0]
        item.scu_role, item.scp_role = False, True
        ext.append(item)
    port = server.getsockname()[1]
    ae.associate("127.0.0.1", port, ae_title=called, ext_neg=ext, evt_handlers=handlers)
    server.close()
    return captured[0]


def test_a_storage_request_is_plain_and_a_query_request_is_left_to_pynetdicom() -> None:
    ct = str(AllStoragePresentationContexts[0].abstract_syntax)
    storage = ul.parse_associate_rq(_request([(ct, ["1.2.840.10008.1.2.1"])]))
    assert storage.plain, storage.why_not_plain
    assert (storage.calling_ae, storage.called_ae) == ("PEER", "ANY-SCP")
    query = ul.parse_associate_rq(
        _request(
            [
                (ct, ["1.2.840.10008.1.2"]),
                (StudyRootQueryRetrieveInformationModelFind, ["1.2.840.10008.1.2"]),
            ]
        )
    )
    assert not query.plain and "abstract syntax" in query.why_not_plain
    roles = ul.parse_associate_rq(_request([(ct, ["1.2.840.10008.1.2"])], role=True))
    assert not roles.plain and "user information" in roles.why_not_plain


@pytest.mark.parametrize(
    "proposed",
    [
        ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
        ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"],
        ["1.2.840.10008.1.2.5"],
        ["1.2.3.4.5.6"],
        ["1.2.3.4.5.6", "1.2.840.10008.1.2.2"],
    ],
)
def test_transfer_syntax_choice_is_pynetdicoms(proposed: list[str]) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ours = ul.negotiate((ul.ProposedContext(1, ct, tuple(proposed)),))
    rq = PresentationContext()
    rq.context_id, rq.abstract_syntax, rq.transfer_syntax = 1, ct, list[Any](proposed)
    ac = PresentationContext()
    ac.abstract_syntax, ac.transfer_syntax = ct, list(ALL_TRANSFER_SYNTAXES)
    theirs, _ = negotiate_as_acceptor([rq], [ac])
    assert ours == [(1, theirs[0].result, str(theirs[0].transfer_syntax[0]))]


def test_storescu_is_served_by_the_fast_path_and_stored_as_sent(
    scp_factory: ScpFactory, phantom_files: list[Path]
) -> None:
    storescu = require_tool("storescu")
    scp = scp_factory()
    assert scp.fast is not None
    # When dcmtk's storescu sends a series
    files = phantom_files[:5]
    subprocess.run(
        [storescu, "-aec", scp.settings.ae_title, "127.0.0.1", str(scp.port), *map(str, files)],
        check=True,
        env=TCP_NODELAY,
        capture_output=True,
    )
    # Then the fast path served it and each spooled file holds the data set as sent,
    # under file meta naming the node's implementation and the sender
    assert scp.fast.served == 1
    assert scp.counters.stored == len(files)
    for path in files:
        sent = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        (stored,) = scp.spool.index.instance_versions(uid)
        data = stored.path.read_bytes()
        assert data[split_file_meta(data)[0] :] == sent[split_file_meta(sent)[0] :]
        meta = dcmread(stored.path, stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID == ul.IMPLEMENTATION_CLASS_UID
        assert meta.SourceApplicationEntityTitle == "STORESCU"


def test_c_echo_and_rejections_on_the_fast_path(scp_factory: ScpFactory) -> None:
    echoscu = require_tool("echoscu")
    scp = scp_factory()
    ok = subprocess.run(
        [echoscu, "-aec", scp.settings.ae_title, "127.0.0.1", str(scp.port)],
        env=TCP_NODELAY,
        capture_output=True,
    )
    assert ok.returncode == 0
    assert scp.fast is not None and scp.fast.served == 1
    # A wrong called AE title: rejected-permanent, service user, called AE not recognised.
    # (Read off the socket: pynetdicom's requestor reports a rejection followed at once by
    # the close as an abort when its thread is late, a race of its own.)
    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as sock:
        sock.sendall(_request([(str(Verification), ["1.2.840.10008.1.2"])], called="SOMEONE-ELSE"))
        rj = b""
        while len(rj) < 10 and (chunk := sock.recv(10 - len(rj))):
            rj += chunk
    assert rj[:1] == b"\x03" and tuple(rj[7:10]) == (1, 1, 7)


def test_an_instance_over_the_maximum_is_refused_and_the_association_goes_on(
    scp_factory: ScpFactory, phantom_files: list[Path]
) -> None:
    # Given a node taking instances of at most 1 MiB
    scp = scp_factory(max_instance_mb=1)
    small = phantom_files[0]
    big = small.parent / "big.dcm"
    ds = dcmread(small)
    ds.Rows = ds.Columns = 1024  # 2 MiB of pixels
    ds.PixelData = bytes(1024 * 1024 * 2)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.999")
    ds.save_as(big)
    # When it and a small one come on one association
    results = send_files(Peer(scp.settings.ae_title, "127.0.0.1", scp.port), [big, small], "PEER")
    # Then the big one is refused as out of resources, the small one stored
    assert [r.status for r in results] == [status.REFUSED_OUT_OF_RESOURCES, status.SUCCESS]
    assert scp.counters.failed == 1 and scp.counters.stored == 1


def test_a_stalled_peer_loses_its_association_after_the_network_timeout(
    scp_factory: ScpFactory,
) -> None:
    scp = scp_factory(network_timeout_s=1.0)
    ct = str(AllStoragePresentationContexts[0].abstract_syntax)
    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as sock:
        sock.sendall(_request([(ct, ["1.2.840.10008.1.2.1"])], called=scp.settings.ae_title))
        accepted = sock.recv(6)
        assert accepted[:1] == b"\x02"
        sock.recv(65536)  # the rest of the A-ASSOCIATE-AC
        # When the peer sends half a PDU header and then nothing
        sock.sendall(b"\x04\x00")
        start = time.monotonic()
        # Then the node aborts within the network timeout and closes
        data = b""
        while chunk := sock.recv(64):
            data += chunk
        assert data[:1] == b"\x07"  # A-ABORT
        assert 0.9 < time.monotonic() - start < 5.0


def test_error_comment_is_one_clean_lo_value() -> None:
    command = ul.parse_command(
        ul.store_response("1.2.3", "1.2.3.4", 7, 0xC210, "bad \\ value\n" + "x" * 100)
    )
    comment = command[0x0902]
    assert len(comment) <= 64 and b"\\" not in comment and b"\n" not in comment
    assert struct.unpack("<H", command[0x0900])[0] == 0xC210


def _big_instance(small: Path, name: str, uid: str, mib: int) -> Path:
    """A copy of a phantom slice with ``mib`` MiB of pixels (1024 columns of 16 bits)."""
    big = small.parent / name
    ds = dcmread(small)
    ds.Rows, ds.Columns = mib * 512, 1024
    ds.PixelData = os.urandom(mib * 2**20)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    ds.save_as(big)
    return big


def test_an_instance_over_the_memory_limit_is_received_into_a_file_and_stored_as_sent(
    scp_factory: ScpFactory, phantom_files: list[Path]
) -> None:
    storescu = require_tool("storescu")
    # Given a node that keeps instances of up to 1 MiB in memory
    scp = scp_factory(receive_in_memory_mb=1)
    small = phantom_files[0]
    big = _big_instance(small, "big.dcm", "1.2.3.998", 3)
    # When storescu sends a 3 MiB instance and a small one on one association
    subprocess.run(
        [storescu, "-aec", scp.settings.ae_title, "127.0.0.1", str(scp.port), str(big), str(small)],
        check=True,
        env=TCP_NODELAY,
        capture_output=True,
    )
    # Then both are stored as sent and indexed with the SHA-256 of their spool file
    assert scp.fast is not None and scp.fast.served == 1
    assert scp.counters.stored == 2 and scp.counters.failed == 0
    for path in (big, small):
        sent = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        (stored,) = scp.spool.index.instance_versions(uid)
        data = stored.path.read_bytes()
        assert data[split_file_meta(data)[0] :] == sent[split_file_meta(sent)[0] :]
        assert stored.sha256 == hashlib.sha256(data).hexdigest()
    # ...the large one never in memory nor in the receive log (it went through a file of
    # the tmp folder, which is empty again), the small one through the log
    assert all(b.capacity <= 2**20 for b in scp.spool.buffers._free)
    logged = [
        r.body
        for segment in journal.segment_files(scp.settings.data_dir)
        for r in journal.read_segment(segment)
    ]
    assert len(logged) == 1 and len(logged[0]) < 2**20
    assert list(scp.spool.tmp.iterdir()) == []


def test_a_large_instance_cut_short_or_over_the_maximum_leaves_nothing_behind(
    scp_factory: ScpFactory, phantom_files: list[Path]
) -> None:
    scp = scp_factory(receive_in_memory_mb=1, max_instance_mb=2)
    small = phantom_files[0]
    # When a 3 MiB instance comes, over the maximum of 2 MiB but past the memory limit
    too_big = _big_instance(small, "too-big.dcm", "1.2.3.997", 3)
    results = send_files(Peer(scp.settings.ae_title, "127.0.0.1", scp.port), [too_big], "PEER")
    assert [r.status for r in results] == [status.REFUSED_OUT_OF_RESOURCES]
    # ...and a peer stops in the middle of a 1.5 MiB data set (past the memory limit)
    ct = str(AllStoragePresentationContexts[0].abstract_syntax)

    def element(number: int, value: bytes) -> bytes:  # implicit VR little endian
        return struct.pack("<HHI", 0x0000, number, len(value)) + value

    command = b"".join(
        (
            element(0x0002, ct.encode() + b"\0"),
            element(0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
            element(0x0110, struct.pack("<H", 1)),
            element(0x0700, struct.pack("<H", 0)),
            element(0x0800, struct.pack("<H", 0x0000)),  # a data set follows
            element(0x1000, b"1.2.3.996\0"),
        )
    )
    command = element(0x0000, struct.pack("<I", len(command))) + command

    def pdv(control: int, value: bytes) -> bytes:
        item = struct.pack(">I", len(value) + 2) + bytes((1, control)) + value
        return struct.pack(">BxI", 0x04, len(item)) + item

    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as sock:
        sock.sendall(_request([(ct, ["1.2.840.10008.1.2.1"])], called=scp.settings.ae_title))
        assert sock.recv(6)[:1] == b"\x02"
        sock.recv(65536)
        sock.sendall(pdv(0x03, command))
        for _ in range(12):
            sock.sendall(pdv(0x00, os.urandom(128 * 2**10)))
        time.sleep(0.5)
        assert len(list(scp.spool.tmp.iterdir())) == 1  # it is being received into a file
    # Then neither is stored, and no file is left in the tmp folder
    deadline = time.monotonic() + 10
    while list(scp.spool.tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(scp.spool.tmp.iterdir()) == []
    assert scp.spool.index.instance_versions("1.2.3.997") == []
    assert scp.spool.index.instance_versions("1.2.3.996") == []
