"""Receiving processes on one port (SO_REUSEPORT): connections spread over them, and a
receiver killed mid-transfer loses no acknowledged instance (its successor replays its
receive log)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicomnode.app.node import Node
from dicomnode.db import Database
from dicomnode.net import status
from dicomnode.net.scu import Peer, SendResult, send_files
from dicomnode.spool.index import Index
from dicomnode.spool.structure import split_file_meta
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

SPEC = PhantomSpec(rows=128, columns=128, slices=16, pixel_spacing=(2.0, 2.0), n_lesions=1)


def _node(node_factory: Callable[..., Node], receivers: int, max_associations: int = 16) -> Node:
    base = node_factory(start=False, quiet_period_s=3600.0, pacs_port=9)
    settings = dataclasses.replace(
        base.config.node, receivers=receivers, max_associations=max_associations
    )
    config = dataclasses.replace(base.config, node=settings)
    node = Node(config)
    node.start()
    return node


def _studies(folder: Path, count: int) -> list[list[Path]]:
    return [write_phantom(generate_phantom(SPEC), folder / f"s{i}") for i in range(count)]


def _send_all(node: Node, studies: list[list[Path]]) -> dict[Path, int | None]:
    """Each study on its own association, all at once; the status of every file sent."""
    answered: dict[Path, int | None] = {}
    lock = threading.Lock()

    def send(files: list[Path]) -> None:
        def record(i: int, result: SendResult) -> None:
            with lock:
                answered[result.path] = result.status

        # the association may die with its receiver: its other files stay unanswered
        with contextlib.suppress(Exception):
            send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, "PACS", record)

    threads = [threading.Thread(target=send, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answered


def _open_on_port(node: Node, expected: int = 0, timeout: float = 10.0) -> int:
    """The connections the receivers count, once it is ``expected`` or ``timeout`` passed."""
    assert node._shared is not None
    deadline = time.monotonic() + timeout
    while sum(node._shared.associations[:]) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return sum(node._shared.associations[:])


def _owners(node: Node) -> set[str]:
    rows = node.db.connect().execute("SELECT owner FROM receive_checkpoints")
    return {str(r[0]) for r in rows}


def _assert_stored_as_sent(data_dir: Path, acknowledged: list[Path]) -> None:
    index = Index(Database(data_dir))
    for path in acknowledged:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        versions = index.instance_versions(uid)
        assert versions, f"acknowledged {path.name} is not in the index"
        sent = path.read_bytes()
        stored = versions[-1].path.read_bytes()
        assert stored[split_file_meta(stored)[0] :] == sent[split_file_meta(sent)[0] :]


def test_two_receivers_share_the_port(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node = _node(node_factory, receivers=2)
    try:
        # When 12 associations arrive at once
        studies = _studies(tmp_path / "in", 12)
        answered = _send_all(node, studies)
        # Then every instance is acknowledged and stored, and both processes received
        assert set(answered.values()) == {status.SUCCESS}
        assert len(answered) == sum(len(s) for s in studies)
        _assert_stored_as_sent(node.config.node.data_dir, list(answered))
        deadline = time.monotonic() + 10
        while _owners(node) != {"0", "1"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _owners(node) >= {"0", "1"}
        assert node.readiness() == []
    finally:
        node.stop(timeout=30)


def test_a_receiver_killed_mid_transfer_loses_nothing_acknowledged(
    node_factory: Callable[..., Node], tmp_path: Path
) -> None:
    node = _node(node_factory, receivers=2)
    try:
        victim = node._receivers[1]
        assert victim.pid is not None
        studies = _studies(tmp_path / "in", 12)
        result: dict[Path, int | None] = {}
        sender = threading.Thread(target=lambda: result.update(_send_all(node, studies)))
        # When the second receiver is SIGKILLed while the studies arrive
        sender.start()
        time.sleep(0.3)
        os.kill(victim.pid, signal.SIGKILL)
        sender.join(180)
        # Then the node starts a new one, which replays what the dead one acknowledged
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            node._receivers[1] is not victim and node._receivers[1].is_alive()
        ):
            time.sleep(0.2)
        assert node._receivers[1] is not victim and node._receivers[1].is_alive()
        acknowledged = [p for p, code in result.items() if code == status.SUCCESS]
        assert acknowledged
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the new receiver replays before it accepts
            try:
                _assert_stored_as_sent(node.config.node.data_dir, acknowledged)
                break
            except AssertionError:
                time.sleep(0.5)
        _assert_stored_as_sent(node.config.node.data_dir, acknowledged)
        # And what was not acknowledged is accepted when sent again
        again = _send_all(node, studies)
        assert set(again.values()) == {status.SUCCESS}
        # And the associations the dead receiver held no longer count against the limit
        assert node._shared is not None
        assert _open_on_port(node) == 0
    finally:
        node.stop(timeout=30)


def test_the_association_limit_is_the_nodes_not_each_receivers(
    node_factory: Callable[..., Node],
) -> None:
    node = _node(node_factory, receivers=2, max_associations=4)
    try:
        # Given four associations held open, two on each path (Verification alone is served
        # by the fast path; one that also asks for C-FIND goes to pynetdicom)
        held = [_associate(node, query=i % 2 == 1) for i in range(4)]
        assert all(a.is_established for a in held)
        assert _open_on_port(node, 4) == 4
        # When more callers come, whichever receiving process the kernel hands them to
        refused = [_associate(node, query=i % 2 == 1) for i in range(8)]
        # Then each is refused: transient, service provider (presentation), local limit
        for assoc in refused:
            assert assoc.is_rejected
            answer: Any = assoc.acceptor.primitive
            assert (answer.result, answer.result_source, answer.diagnostic) == (2, 3, 2)
        # And once one of the four is released, the next caller is accepted
        held[0].release()
        assert _open_on_port(node, 3) == 3
        again = _associate(node, query=True)
        assert again.is_established
        again.release()
        for assoc in held[1:]:
            assoc.release()
        assert _open_on_port(node, 0) == 0
    finally:
        node.stop(timeout=30)


def _associate(node: Node, *, query: bool) -> Association:
    ae = AE(ae_title="PACS")
    ae.acse_timeout = 10
    ae.add_requested_context(Verification)
    if query:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
