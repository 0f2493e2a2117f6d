"""Association floods beyond ``max_associations``: extra ones are rejected, then it recovers.

A peer (or many) may open more associations than the node allows, or open TCP connections
and send nothing, or send part of a PDU and stall.  The extra associations must be
rejected (A-ASSOCIATE-RJ, transient, local limit exceeded), the held ones keep working, no
connection may hold a slot past the node's timeouts, and once the flood ends the node
accepts again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from security.pki import make_pki

from dicomnode.app.node import Node
from dicomnode.config import TlsSettings
from dicomnode.errors import DeliveryError
from dicomnode.net.scu import Peer, echo
from dicomnode.net.tls import client_context
from dicomnode.net.ul import A_ASSOCIATE_AC, A_ASSOCIATE_RJ

from .harness import (
    FUZZ_AE,
    NODE_AE,
    SEND_TIMEOUT_S,
    Tally,
    assert_serving,
    associate_rq,
    read_pdu,
    watching,
)

MAX_ASSOCIATIONS = 4
REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED = 2, 3, 2


def _associate(node: Node) -> Association:
    ae = AE(ae_title=FUZZ_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SEND_TIMEOUT_S
    ae.connection_timeout = SEND_TIMEOUT_S
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)


def _outcome(assoc: Association) -> str:
    if assoc.is_established:
        return "accepted"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        assert rsp is not None
        return f"rejected {rsp.result}/{rsp.result_source}/{rsp.diagnostic}"
    return "aborted"


def _request(node: Node) -> str:
    """What the node answers an A-ASSOCIATE-RQ with, read from the socket itself."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=SEND_TIMEOUT_S) as sock:
        sock.sendall(associate_rq())
        reply = read_pdu(sock, time.monotonic() + SEND_TIMEOUT_S)
    if reply[:1] == bytes([A_ASSOCIATE_RJ]) and len(reply) == 10:
        return f"rejected {reply[7]}/{reply[8]}/{reply[9]}"
    return "accepted" if reply[:1] == bytes([A_ASSOCIATE_AC]) else f"answered {reply[:1]!r}"


def _active(node: Node) -> int:
    """Associations the node counts against its maximum: pynetdicom's and the fast
    path's."""
    fast = node.scp.fast.active if node.scp.fast is not None else 0
    return fast + len([a for a in node.scp.ae.active_associations if a.is_acceptor])


def _serving_again(node: Node, valid: Path, within: float = 2.0) -> None:
    """The node takes associations again within ``within`` seconds (far below the ACSE
    timeout a held slot would take), then :func:`assert_serving`."""
    peer = Peer(node.config.node.ae_title, "127.0.0.1", node.port, timeout_s=5.0)
    deadline = time.monotonic() + within
    while True:
        try:
            echo(peer, FUZZ_AE)
            break
        except DeliveryError as exc:
            if not exc.transient or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert_serving(node, valid)


def _wait_until_idle(node: Node, timeout: float, settle: float = 0.3) -> None:
    """No association held for ``settle`` seconds in a row: a connection the acceptor has
    just taken (its request still being peeked at) is counted only a moment later."""
    deadline = time.monotonic() + timeout
    idle_since: float | None = None
    while time.monotonic() < deadline:
        now = time.monotonic()
        if _active(node):
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= settle:
            return
        time.sleep(0.02)
    assert _active(node) == 0, f"{_active(node)} association(s) still held after {timeout} s"


@pytest.fixture
def small_node(fuzz_node: Node) -> Node:
    """The fuzz node allowing 4 associations; a silent connection is dropped after 1 s."""
    ae = fuzz_node.scp.ae
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.acse_timeout = 1.0
    return fuzz_node


@pytest.fixture
def impatient_node(small_node: Node) -> Node:
    """``small_node`` whose reads also time out after 1 s (idle associations end too)."""
    small_node.scp.ae.network_timeout = 1.0
    return small_node


def test_associations_beyond_the_maximum_are_rejected(
    small_node: Node, valid_file: Path, tally: Tally
) -> None:
    with watching(tally):
        # Given the node's maximum of associations held open
        held = [_associate(small_node) for _ in range(MAX_ASSOCIATIONS)]
        assert all(a.is_established for a in held)
        try:
            # When 24 more are requested at once (on raw sockets: pynetdicom's requestor
            # reports a rejection that arrives before it looks at its socket as a failed
            # connect, an "abort" the node never sent)
            with ThreadPoolExecutor(max_workers=8) as pool:
                outcomes = list(pool.map(lambda _: _request(small_node), range(24)))
            for outcome in outcomes:
                tally.add("association flood", outcome)
            # Then every extra one is rejected (transient, local limit exceeded) ...
            expected = (
                f"rejected {REJECTED_TRANSIENT}/{SOURCE_PROVIDER_PRESENTATION}/"
                f"{LOCAL_LIMIT_EXCEEDED}"
            )
            assert outcomes == [expected] * 24
            # ... and the held ones still work
            assert all(int(a.send_c_echo().Status) == 0 for a in held)
        finally:
            for a in held:
                a.release()
        # And once they are released the node accepts and stores again
        _wait_until_idle(small_node, 3.0)
        assert_serving(small_node, valid_file)


@pytest.mark.parametrize("first_bytes", [b"", b"\x01\x00"], ids=["silent", "partial PDU"])
def test_stalled_connections_free_their_slots(
    impatient_node: Node, valid_file: Path, tally: Tally, first_bytes: bytes
) -> None:
    small_node = impatient_node
    with watching(tally):
        # Given more TCP connections than the maximum, each silent or stalled mid-PDU
        stalled = [
            socket.create_connection(("127.0.0.1", small_node.port), timeout=SEND_TIMEOUT_S)
            for _ in range(MAX_ASSOCIATIONS + 4)
        ]
        try:
            for sock in stalled:
                sock.sendall(first_bytes)
            # When a real peer asks for an association meanwhile, it is turned away
            # (a stalled connection counts as an association until its timeout) ...
            time.sleep(0.2)
            blocked = _associate(small_node)
            tally.add("stalled connections", f"during: {_outcome(blocked)}")
            if blocked.is_established:
                blocked.release()
            # Then the node drops every stalled connection within its timeouts
            _wait_until_idle(small_node, SEND_TIMEOUT_S)
            closed = 0
            for sock in stalled:
                sock.settimeout(SEND_TIMEOUT_S)
                try:
                    data = sock.recv(1024)
                    while data:
                        data = sock.recv(1024)
                except ConnectionResetError:
                    pass
                closed += 1
            assert closed == len(stalled)
            # (a connection is closed a moment before its thread ends and frees its slot)
            _wait_until_idle(small_node, SEND_TIMEOUT_S)
        finally:
            for sock in stalled:
                sock.close()
        # And it accepts and stores again
        _serving_again(small_node, valid_file)
        tally.add("stalled connections", "recovered")


def test_connections_closed_before_requesting_free_their_slots_at_once(
    fuzz_node: Node, valid_file: Path, tally: Tally
) -> None:
    """pynetdicom waited the whole ACSE timeout (20 s here, 30 s by default) for the
    A-ASSOCIATE-RQ of a connection that had already closed, counting it as an association:
    9 bare connects (a port scan, a TCP health check) turned every peer away meanwhile."""
    fuzz_node.scp.ae.maximum_associations = MAX_ASSOCIATIONS
    with watching(tally):
        # Given twice the maximum of connections opened and closed without a byte
        for _ in range(2 * MAX_ASSOCIATIONS):
            socket.create_connection(("127.0.0.1", fuzz_node.port), timeout=5).close()
        # When a peer then asks for an association
        # Then the slots are free within a second (not after the ACSE timeout) and it is
        # accepted
        _wait_until_idle(fuzz_node, 1.0)
        _serving_again(fuzz_node, valid_file)
        tally.add("connect and close", f"{2 * MAX_ASSOCIATIONS} connects, slots freed")


def test_connection_churn_does_not_leak(small_node: Node, valid_file: Path, tally: Tally) -> None:
    with watching(tally):
        # Given peers that connect and disconnect abruptly, 64 times from 8 threads
        def churn(i: int) -> None:
            with socket.create_connection(("127.0.0.1", small_node.port), timeout=5) as s:
                if i % 2:
                    s.sendall(b"\x01\x00\x00\x00")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")

        errors: list[BaseException] = []
        lock = threading.Lock()

        def safe(i: int) -> None:
            try:
                churn(i)
            except OSError as exc:  # refused/reset under load: a clean ending too
                with lock:
                    errors.append(exc)

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(safe, range(64)))
        elapsed = time.monotonic() - start
        tally.add("connection churn", f"{64 - len(errors)} connects")
        # Then they were all accepted at once (a listen backlog of 5 made connects wait
        # for SYN retransmits, 1 s each), no association is left holding a slot after the
        # 1 s timeouts (copying the contexts cost 68 ms of CPU per connection), and the
        # node serves
        assert elapsed < 3.0, f"64 connects took {elapsed:.1f} s"
        _wait_until_idle(small_node, 3.0)
        assert_serving(small_node, valid_file)


def test_silent_connections_do_not_block_a_tls_node(
    node_factory: Callable[..., Node], tmp_path: Path, tally: Tally
) -> None:
    """pynetdicom did the TLS handshake in its one accepting thread: a client that connects
    and sends nothing stopped the node accepting anyone until it went away."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is required in CI")
        pytest.skip("openssl is not installed")
    pki = make_pki(tmp_path / "pki")
    tls = TlsSettings(
        enabled=True,
        certificate=pki.server_cert,
        private_key=pki.server_key,
        ca_certificates=pki.ca,
    )
    base = node_factory(start=False).config
    node = Node(dataclasses.replace(base, node=dataclasses.replace(base.node, tls=tls)))
    node.start()
    client = client_context(
        TlsSettings(certificate=pki.client_cert, private_key=pki.client_key, ca_certificates=pki.ca)
    )
    peer = Peer(NODE_AE, "127.0.0.1", node.port, 5.0, client)
    try:
        with watching(tally):
            # Given TLS clients that connect and say nothing
            silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
            try:
                time.sleep(0.2)
                # When a real TLS peer asks for an association meanwhile
                start = time.monotonic()
                code = echo(peer, FUZZ_AE)
                # Then it is served at once
                assert code == 0 and time.monotonic() - start < 3.0
                tally.add("silent TLS connections", "echo served")
            finally:
                for sock in silent:
                    sock.close()
    finally:
        node.stop(timeout=10)
