"""Random bytes and malformed PDUs on a raw socket, before and after a valid association.

The node must end each such connection cleanly (A-ABORT, A-ASSOCIATE-RJ or closing it)
within the send timeout, log no exception from a handler, and still serve C-ECHO and a
valid C-STORE.  A PDU announcing gigabytes is refused from its header: the node does not
read (and buffer) its body.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomnode.app.node import Node

from .harness import (
    LIVENESS_EVERY,
    SEND_TIMEOUT_S,
    Tally,
    assert_serving,
    associate_rq,
    fuzz_settings,
    read_pdu,
    wait_closed,
    watching,
)

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 2, 3, 4, 5, 6, 7
RELEASE_RQ = struct.pack(">BxL4x", A_RELEASE_RQ, 4)
#: What a node may answer malformed input with (or it closes the connection: b"").
CLEAN_ENDINGS = {A_ABORT, A_ASSOCIATE_RJ, A_RELEASE_RP, A_ASSOCIATE_AC, P_DATA_TF}


def _connect(node: Node) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=SEND_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _established(node: Node) -> socket.socket:
    sock = _connect(node)
    sock.sendall(associate_rq())
    reply = read_pdu(sock, time.monotonic() + SEND_TIMEOUT_S)
    assert reply[:1] == bytes([A_ASSOCIATE_AC]), f"no A-ASSOCIATE-AC: {reply[:16]!r}"
    return sock


def _send(sock: socket.socket, data: bytes) -> None:
    # the node may already have ended the connection: a clean ending too
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _outcome(reply: bytes) -> str:
    names = {A_ABORT: "A-ABORT", A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", A_RELEASE_RP: "A-RELEASE-RP"}
    names |= {A_ASSOCIATE_AC: "A-ASSOCIATE-AC", P_DATA_TF: "P-DATA-TF"}
    return names.get(reply[0], f"PDU 0x{reply[0]:02X}") if reply else "closed"


def _framed(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BxL", kind, len(payload)) + payload


def _random_pdu() -> st.SearchStrategy[bytes]:
    """A PDU with a consistent length: a known or unknown type, random content."""
    kinds = st.one_of(st.integers(1, 7), st.integers(0, 255))
    return st.builds(_framed, kinds, st.binary(min_size=0, max_size=512))


def _random_p_data() -> st.SearchStrategy[bytes]:
    """P-DATA-TF with random PDVs: context id, message control header, random fragment."""
    pdv = st.builds(
        lambda cid, control, data: struct.pack(">LBB", len(data) + 2, cid, control) + data,
        st.sampled_from([1, 3, 5, 255]),
        st.integers(0, 3) | st.integers(0, 255),
        st.binary(min_size=0, max_size=256),
    )
    return st.lists(pdv, min_size=0, max_size=4).map(lambda p: _framed(P_DATA_TF, b"".join(p)))


class PduCampaign:
    def __init__(self, category: str, node: Node, valid: Path, tally: Tally) -> None:
        self.category, self.node, self.valid, self.tally = category, node, valid, tally
        self.cases = 0

    def record(self, reply: bytes) -> None:
        self.cases += 1
        self.tally.add(self.category, _outcome(reply))
        assert not reply or reply[0] in CLEAN_ENDINGS, f"unexpected answer {reply[:16]!r}"
        if self.cases % LIVENESS_EVERY == 0:
            assert_serving(self.node, self.valid)


@pytest.fixture
def pdu_node(fuzz_node: Node) -> Node:
    """The fuzz node with short ACSE / network timeouts (they bound each case)."""
    fuzz_node.scp.ae.acse_timeout = 1.0
    fuzz_node.scp.ae.network_timeout = 1.0
    return fuzz_node


def test_random_bytes_before_association(pdu_node: Node, valid_file: Path, tally: Tally) -> None:
    run = PduCampaign("PDU before association", pdu_node, valid_file, tally)

    @fuzz_settings(max_examples=120)
    @given(data=st.one_of(st.binary(min_size=1, max_size=1024), _random_pdu()), close=st.booleans())
    def case(data: bytes, close: bool) -> None:
        # Given a connection whose first bytes are random (or a random PDU)
        with _connect(pdu_node) as sock:
            # When they are sent, with or without the sender half-closing afterwards
            _send(sock, data)
            if close:
                sock.shutdown(socket.SHUT_WR)
            # Then the node answers with an abort / reject or closes, within the timeout
            deadline = time.monotonic() + SEND_TIMEOUT_S
            reply = read_pdu(sock, deadline) if not close else wait_closed(sock)
            run.record(reply)

    with watching(tally):
        case()
        assert run.cases >= 120
        assert_serving(pdu_node, valid_file)


def test_random_pdus_after_association(pdu_node: Node, valid_file: Path, tally: Tally) -> None:
    run = PduCampaign("PDU after association", pdu_node, valid_file, tally)

    @fuzz_settings(max_examples=120)
    @given(data=st.one_of(st.binary(min_size=1, max_size=1024), _random_pdu(), _random_p_data()))
    def case(data: bytes) -> None:
        # Given an established association
        with _established(pdu_node) as sock:
            # When random bytes or PDUs follow, then a release request
            _send(sock, data + RELEASE_RQ)
            # Then the node ends the association (release, abort or close) in time;
            # it may first answer a P-DATA that happened to be a valid request
            deadline = time.monotonic() + SEND_TIMEOUT_S
            reply = read_pdu(sock, deadline)
            while reply[:1] == bytes([P_DATA_TF]):
                reply = read_pdu(sock, deadline)
            run.record(reply)

    with watching(tally):
        case()
        assert run.cases >= 120
        assert_serving(pdu_node, valid_file)


@pytest.mark.parametrize("when", ["before association", "after association"])
@pytest.mark.parametrize("kind", [0x01, P_DATA_TF])
def test_pdu_announcing_gigabytes_is_refused_unread(
    pdu_node: Node, valid_file: Path, tally: Tally, when: str, kind: int
) -> None:
    # Given a connection (before or after association) and a PDU header announcing 2 GiB
    sock = _established(pdu_node) if when == "after association" else _connect(pdu_node)
    with sock:
        _send(sock, struct.pack(">BxL", kind, 0x80000000) + b"\0" * 65536)
        # When the sender then keeps the connection open without sending more
        start = time.monotonic()
        # Then the node closes it at once instead of waiting to buffer 2 GiB
        reply = wait_closed(sock, timeout=2.0)
        elapsed = time.monotonic() - start
    tally.add("2 GiB PDU", _outcome(reply))
    assert elapsed < 2.0
    assert_serving(pdu_node, valid_file)
