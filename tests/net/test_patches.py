"""Each patch of :mod:`dicomnode.net.patches`, with it and without it.

Every test runs its scenario twice: ``patched`` (as the node runs) and ``upstream``, with that
one patch replaced by a no-op (or pynetdicom's own class), and asserts the upstream
behaviour the patch exists for.  An upstream test that starts failing means pynetdicom
changed that behaviour: the patch may have become unnecessary (or wrong), and the
supported range in ``SUPPORTED_PYNETDICOM`` needs a look.
"""

from __future__ import annotations

import copy
import logging
import queue
import socket
import struct
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from fuzz.harness import CrashWatch, associate_rq, read_pdu, wait_closed
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import AllowedCaller, NodeSettings
from dicomnode.errors import ConfigError, DeliveryError
from dicomnode.net import patches, status
from dicomnode.net.scp import FolderSCP, StorageSCP
from dicomnode.net.scu import Peer, echo, send_files

ScpFactory = Callable[..., StorageSCP]
NODE_AE, CALLER_AE = "DICOMNODE", "MODALITY"
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_ABORT = 2, 3, 4, 7
TIMEOUT_S = 10.0

both = pytest.mark.parametrize("patched", [True, False], ids=["patched", "upstream"])


def _without(
    monkeypatch: pytest.MonkeyPatch, name: str, patched: bool, upstream: Any = None
) -> None:
    """Replace ``patches.<name>`` by ``upstream`` (default: a no-op) unless ``patched``."""
    if not patched:
        monkeypatch.setattr(patches, name, upstream or (lambda *args, **kwargs: None))


def _connections(scp: StorageSCP) -> queue.Queue[Association]:
    """The SCP's associations from now on, each as its connection opens."""
    opened: queue.Queue[Association] = queue.Queue()
    assert scp._server is not None
    scp._server.bind(evt.EVT_CONN_OPEN, lambda event: opened.put(event.assoc))
    return opened


def _join(assoc: Association, timeout: float) -> None:
    """``assoc.join(timeout)``, once its thread has started (EVT_CONN_OPEN comes before)."""
    deadline = time.monotonic() + timeout
    while assoc.ident is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assoc.join(timeout=max(0.0, deadline - time.monotonic()))


def _established(scp: StorageSCP) -> socket.socket:
    """A raw socket with an association established (Verification, CT Image Storage)."""
    sock = socket.create_connection(("127.0.0.1", scp.port), timeout=TIMEOUT_S)
    sock.sendall(associate_rq(called=NODE_AE, calling=CALLER_AE))
    reply = read_pdu(sock, time.monotonic() + TIMEOUT_S)
    assert reply[:1] == bytes([A_ASSOCIATE_AC]), f"no A-ASSOCIATE-AC: {reply[:16]!r}"
    return sock


def _p_data(command_set: bytes, context_id: int = 3) -> bytes:
    """P-DATA-TF with one PDV: a whole command set (message control header 0x03)."""
    pdv = struct.pack(">LBB", len(command_set) + 2, context_id, 0x03) + command_set
    return struct.pack(">BxL", P_DATA_TF, len(pdv)) + pdv


def _assert_serving(scp: StorageSCP, valid: Path) -> None:
    peer = Peer(NODE_AE, "127.0.0.1", scp.port, timeout_s=TIMEOUT_S)
    assert echo(peer, CALLER_AE) == status.SUCCESS
    assert [r.status for r in send_files(peer, [valid], CALLER_AE)] == [status.SUCCESS]


# --- the supported versions ----------------------------------------------------------------


def test_the_installed_pynetdicom_is_supported() -> None:
    patches.check_pynetdicom()


@pytest.mark.parametrize("version", ["3.1.0", "3.0.3", "2.1.1", "4.0.0", "3.1.0.dev0", "git"])
def test_an_untested_pynetdicom_stops_the_node_at_start_up(
    monkeypatch: pytest.MonkeyPatch, version: str, tmp_path: Path
) -> None:
    # Given a pynetdicom outside the supported range
    monkeypatch.setattr(pynetdicom, "__version__", version)
    # When the node's SCP (or the folder SCP) is built
    # Then it refuses, naming the installed and the supported versions
    with pytest.raises(ConfigError) as refused:
        StorageSCP(NodeSettings(port=0, data_dir=tmp_path), spool=None)  # type: ignore[arg-type]
    assert f"pynetdicom {version} is installed" in str(refused.value)
    assert patches.SUPPORTED_PYNETDICOM in str(refused.value)
    with pytest.raises(ConfigError):
        FolderSCP("PACS", tmp_path / "pacs")


@pytest.mark.parametrize("version", ["3.0.4", "3.0.5", "3.0.10rc1"])
def test_versions_in_the_range_are_accepted(version: str) -> None:
    patches.check_pynetdicom(version)


def test_pyproject_pins_the_supported_range() -> None:
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert f"pynetdicom{patches.SUPPORTED_PYNETDICOM}" in dependencies


# --- the acceptor's server ---------------------------------------------------------------


@pytest.fixture
def scp_factory(scp_factory: ScpFactory) -> ScpFactory:
    """These tests are about pynetdicom's acceptor: the receive fast path (net/ul.py),
    which would serve their plain storage associations, stays off."""

    def make(**settings: Any) -> StorageSCP:
        return scp_factory(**{"fast_receive": False, **settings})

    return make


@both
def test_accepted_sockets_get_tcp_nodelay_and_the_network_timeout(
    scp_factory: ScpFactory, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    _without(monkeypatch, "NoDelayServer", patched, ThreadedAssociationServer)
    scp = scp_factory(network_timeout_s=7.0)
    opened = _connections(scp)
    # Given an association from a peer
    with _established(scp):
        # When the node's side of the connection is looked at
        sock = patches.association_socket(opened.get(timeout=TIMEOUT_S))
        assert sock is not None
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # Then it has TCP_NODELAY and the network timeout; upstream, neither
        assert (bool(nodelay), sock.gettimeout()) == ((True, 7.0) if patched else (False, None))


@both
def test_a_connection_stalled_mid_pdu_frees_its_slot(
    scp_factory: ScpFactory, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    _without(monkeypatch, "NoDelayServer", patched, ThreadedAssociationServer)
    scp = scp_factory(network_timeout_s=1.0)
    opened = _connections(scp)
    # Given a connection that sends 2 bytes of a PDU header, then nothing
    with socket.create_connection(("127.0.0.1", scp.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"\x01\x00")
        assoc = opened.get(timeout=TIMEOUT_S)
        # When the network timeout (1 s) has passed twice over
        _join(assoc, 3.0)
        # Then its association has ended; upstream, the accepted socket has no timeout
        # and the association holds its slot of max_associations for as long as the peer
        # keeps the connection open
        assert assoc.is_alive() is not patched
    _join(assoc, TIMEOUT_S)


@both
def test_copying_the_supported_contexts_per_connection_is_cheap(
    scp_factory: ScpFactory, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    _without(monkeypatch, "share_supported_contexts", patched)
    # pynetdicom copies the server's supported contexts for each connection it accepts
    copies: list[tuple[float, list[Any]]] = []

    def timed_deepcopy(value: Any, memo: dict[int, Any] | None = None) -> Any:
        start = time.thread_time()
        result = copy.deepcopy(value, memo)
        copies.append((time.thread_time() - start, result))
        return result

    monkeypatch.setattr(pynetdicom.transport, "deepcopy", timed_deepcopy)
    scp = scp_factory()
    assert scp._server is not None
    contexts = scp._server.contexts
    opened = _connections(scp)
    # Given connections opened and closed without a byte (a port scan, a health check)
    for _ in range(3):
        socket.create_connection(("127.0.0.1", scp.port), timeout=TIMEOUT_S).close()
        opened.get(timeout=TIMEOUT_S)
    # Then each copy of all storage SOP classes x all transfer syntaxes takes well under
    # 5 ms of CPU (upstream's deep copy: ~40 ms), and is still a copy of its own
    cpu = [seconds for seconds, _ in copies]
    assert len(copies) == 3
    assert all(s < 0.005 for s in cpu) if patched else all(s > 0.005 for s in cpu), cpu
    for _, copied in copies:
        assert len(copied) == len(contexts) > 100
        assert copied[0] is not contexts[0]
        assert copied[0].transfer_syntax == contexts[0].transfer_syntax


@both
def test_a_server_made_with_make_server_can_be_stopped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, patched: bool
) -> None:
    _without(monkeypatch, "register_server", patched)
    # Given a running SCP (its server made with AE.make_server)
    scp = FolderSCP("PACS", tmp_path / "pacs")
    scp.start()
    assert echo(Peer("PACS", "127.0.0.1", scp.port), CALLER_AE) == status.SUCCESS
    server = scp._server
    assert server is not None
    # When it is stopped
    if patched:
        scp.stop()
    else:
        # Then upstream's shutdown() fails removing a server its AE never listed
        with pytest.raises(ValueError):
            scp.stop()
        server.server_close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=1)


# --- each accepted association -----------------------------------------------------------


@both
def test_a_caller_from_a_host_not_allowed_is_rejected_at_association(
    scp_factory: ScpFactory, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    _without(monkeypatch, "check_caller_host", patched)
    # Given a node that allows AE PACS from 192.0.2.7 only
    scp = scp_factory(allowed_callers=(AllowedCaller("PACS", ("192.0.2.7",)),))
    # When PACS asks for an association from 127.0.0.1
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=NODE_AE)
    try:
        # Then it is rejected (permanent, service user, calling AE title not recognised);
        # upstream only checks the AE title and accepts it
        if patched:
            assert assoc.is_rejected and assoc.acceptor.primitive is not None
            rsp = assoc.acceptor.primitive
            assert (rsp.result, rsp.result_source, rsp.diagnostic) == (1, 1, 3)
        else:
            assert assoc.is_established
    finally:
        if assoc.is_established:
            assoc.release()


@both
def test_a_pdu_announcing_gigabytes_is_refused_unread(
    scp_factory: ScpFactory, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    _without(monkeypatch, "limit_pdu_length", patched)
    scp = scp_factory(network_timeout_s=TIMEOUT_S)
    # Given an association, and a P-DATA header announcing 2 GiB followed by 64 KiB
    with _established(scp) as sock:
        sock.sendall(struct.pack(">BxL", P_DATA_TF, 0x80000000) + b"\0" * 65536)
        # When the peer then sends nothing more
        if patched:
            # Then the node closes the connection at once, without reading the body
            assert wait_closed(sock, timeout=2.0) == b""
        else:
            # Upstream reads on, buffering what comes, until the network timeout
            with pytest.raises(AssertionError, match="hang"):
                wait_closed(sock, timeout=1.0)


#: An implicit VR command set with an Affected SOP Class UID and no Command Field.
NO_COMMAND_FIELD = struct.pack("<HHL", 0x0000, 0x0002, 18) + b"1.2.840.10008.1.1\0"


@both
def test_an_undecodable_dimse_command_is_answered_with_a_abort(
    scp_factory: ScpFactory, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    _without(monkeypatch, "abort_on_undecodable_dimse", patched)
    scp = scp_factory()
    # Given an association
    with _established(scp) as sock:
        # When a P-DATA carries a command set without a Command Field
        sock.sendall(_p_data(NO_COMMAND_FIELD))
        reply = wait_closed(sock)
    # Then the node answers A-ABORT; upstream raises out of its state machine (here
    # contained by contain_reactor_errors) and drops the connection without one
    if patched:
        assert reply[:1] == bytes([A_ABORT])
    else:
        assert reply == b""


@both
def test_an_exception_in_the_state_machine_ends_the_association_in_one_line(
    scp_factory: ScpFactory,
    monkeypatch: pytest.MonkeyPatch,
    patched: bool,
    caplog: pytest.LogCaptureFixture,
    small_file: Path,
) -> None:
    _without(monkeypatch, "contain_reactor_errors", patched)
    scp = scp_factory()
    opened = _connections(scp)
    # Given an association
    with (
        CrashWatch() as watch,
        caplog.at_level(logging.WARNING, "dicomnode.net.patches"),
        _established(scp) as sock,
    ):
        assoc = opened.get(timeout=TIMEOUT_S)
        # When the peer sends an A-ABORT with an invalid source (5), which makes
        # pynetdicom's state machine raise ValueError
        sock.sendall(struct.pack(">BxL4B", A_ABORT, 4, 0, 0, 5, 0))
        wait_closed(sock)
        assoc.dul.join(timeout=TIMEOUT_S)
    contained = [r.getMessage() for r in caplog.records if r.name == "dicomnode.net.patches"]
    if patched:
        # Then the association ends with one warning, and no thread dies
        assert watch.crashes == []
        assert len(contained) == 1 and "Invalid A-ABORT 'Source'" in contained[0]
    else:
        # Upstream, the exception kills the DUL thread
        assert any("died: ValueError" in crash for crash in watch.crashes), watch.crashes
        assert contained == []
    _assert_serving(scp, small_file)


@both
def test_a_connection_closed_before_its_request_frees_its_slot_at_once(
    scp_factory: ScpFactory, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    _without(monkeypatch, "end_when_closed_before_request", patched)
    scp = scp_factory(network_timeout_s=3.0)  # and the ACSE timeout: 3 s
    opened = _connections(scp)
    # Given a connection opened and closed without a byte
    socket.create_connection(("127.0.0.1", scp.port), timeout=TIMEOUT_S).close()
    assoc = opened.get(timeout=TIMEOUT_S)
    # When a second passes
    _join(assoc, 1.0)
    # Then its association has ended; upstream it waits for the A-ASSOCIATE-RQ until the
    # ACSE timeout, holding a slot of max_associations
    assert assoc.is_alive() is not patched
    _join(assoc, TIMEOUT_S)


# --- the requestor -------------------------------------------------------------------------


@both
def test_the_requestor_sets_tcp_nodelay(
    monkeypatch: pytest.MonkeyPatch, folder_scp: FolderSCP, patched: bool
) -> None:
    nodelay: list[int] = []
    set_no_delay = patches.set_no_delay if patched else (lambda assoc: None)

    def spy(assoc: Association) -> None:
        set_no_delay(assoc)
        sock = patches.association_socket(assoc)
        assert sock is not None
        nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(patches, "set_no_delay", spy)
    # When the node associates with a peer
    assert echo(Peer("PACS", "127.0.0.1", folder_scp.port), CALLER_AE) == status.SUCCESS
    # Then its socket has TCP_NODELAY; upstream leaves Nagle's algorithm on
    assert [bool(n) for n in nodelay] == [patched]


def _race_for_the_response(assoc: Association) -> None:
    """Make the association's reactor take the next response before the sender does: what
    pynetdicom's pause race does about once in 1,000 back-to-back C-STOREs."""
    dimse: Any = assoc.dimse
    get_msg = dimse.get_msg
    raced = threading.Event()

    def racing_get_msg(block: bool = False) -> Any:
        if block and not raced.is_set():  # the sender waiting for its response
            raced.set()
            context_id, msg = get_msg(block=True)
            assoc._serve_request(msg, context_id)  # as the unpaused reactor does
        return get_msg(block=block)

    dimse.get_msg = racing_get_msg


@both
def test_a_response_taken_by_the_reactor_reaches_the_sender(
    monkeypatch: pytest.MonkeyPatch,
    folder_scp: FolderSCP,
    small_file: Path,
    patched: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keep = patches.keep_stray_responses if patched else (lambda assoc: None)

    def keep_and_race(assoc: Association) -> None:
        keep(assoc)
        _race_for_the_response(assoc)

    monkeypatch.setattr(patches, "keep_stray_responses", keep_and_race)
    peer = Peer("PACS", "127.0.0.1", folder_scp.port, timeout_s=1.0)
    # Given the reactor takes the C-STORE response off the queue before the sender
    with caplog.at_level(logging.WARNING, "pynetdicom"):
        if patched:
            # Then the response is put back, and the sender gets it
            assert [r.status for r in send_files(peer, [small_file], CALLER_AE)] == [0]
        else:
            # Upstream drops it as an unexpected message; the sender waits for the DIMSE
            # timeout and the association is aborted
            with pytest.raises(DeliveryError, match="lost"):
                send_files(peer, [small_file], CALLER_AE)
    dropped = [r for r in caplog.records if "unexpected C-STORE" in r.getMessage()]
    assert bool(dropped) is not patched


def test_every_patch_has_its_test() -> None:
    """The patches this module tests are all of those :mod:`dicomnode.net.patches` has."""
    tested = {
        "NoDelayServer",
        "share_supported_contexts",
        "register_server",
        "check_caller_host",
        "limit_pdu_length",
        "abort_on_undecodable_dimse",
        "contain_reactor_errors",
        "end_when_closed_before_request",
        "set_no_delay",
        "keep_stray_responses",
    }
    helpers = {
        "check_pynetdicom",
        "make_server",
        "guard_association",
        "prepare_requestor",
        "association_socket",
        "ContextList",  # share_supported_contexts
        "CallerCheckingACSE",  # check_caller_host
        "ReusePortServer",  # NoDelayServer with SO_REUSEPORT: tests/app/test_receivers.py
    }
    defined = {
        name
        for name, value in vars(patches).items()
        if not name.startswith("_")
        and callable(value)
        and getattr(value, "__module__", "") == patches.__name__
    }
    assert defined - helpers == tested
