"""Destinations that are down, hang or refuse: back-off, no starvation, dead-letter, retry.

Two destinations per route: while one is down (nothing listens) or hangs (accepts TCP and
never answers), the other receives its results at once; the first gets them, once each,
when it is back, and its outbox rows back off in between instead of retrying in a storm.
A destination that refuses for good (0xA900, 0x0122) dead-letters the result with that
status, fails the job, shows it in ``dicomnode jobs`` and takes ``dicomnode jobs retry``.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app.node import Node
from dicomnode.audit import read_audit
from dicomnode.config import Remote, RetrySettings
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.synthetic.phantom import Phantom

from .harness import AnsweringSCP, Pacs, SilentListener, free_port, jobs_cli, wait_until

NodeFactory = Callable[..., Node]
FAST = RetrySettings(max_attempts=1000, backoff_initial_s=0.2, backoff_max_s=1.0)


def _send(node: Node, files: list[Path]) -> None:
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, "MODALITY")
    assert [r.status for r in results] == [0] * len(files), [r.error for r in results]


def _uids(paths: list[Path]) -> list[str]:
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)


def _jobs(node: Node) -> str:
    return repr([(j.id, j.state, j.last_error) for j in node.jobs.list_jobs()])


@pytest.mark.slow
@pytest.mark.peer
def test_down_destination_backs_off_and_the_other_is_served_meanwhile(
    dcmtk: None,
    node_factory: NodeFactory,
    phantom_files: list[Path],
    tmp_path: Path,
) -> None:
    # Given PACS A (dcmtk storescp) that is down and PACS B that is up
    pacs_a = Pacs(free_port(), tmp_path / "a")
    pacs_b = FolderSCP("PACSB", tmp_path / "b")
    pacs_b.start()
    node = node_factory(
        remotes=[
            Remote("a", "PACS", "127.0.0.1", pacs_a.port, 5.0),
            Remote("b", "PACSB", "127.0.0.1", pacs_b.port, 5.0),
        ],
        destinations=("a", "b"),
        quiet_period_s=0.5,
        delivery=FAST,
    )
    try:
        # When a study is processed
        _send(node, phantom_files)

        # Then B receives SEG and SR while A is down
        received_b = pacs_b.wait_for(2, timeout=60)
        assert len(received_b) == 2, _jobs(node)
        job = node.jobs.list_jobs()[0]
        assert job.state == "sending"
        items_a = [i for i in node.outbox.items(job.id) if i.destination == "a"]
        assert [i.state for i in items_a] != ["done", "done"]

        # And A's rows back off (0.2, 0.4, 0.8 s ...) instead of retrying at every poll
        def failures_a() -> list[float]:
            return [
                datetime.fromisoformat(r["ts"]).timestamp()
                for r in read_audit(node.config.node.audit_path)
                if r["event"] == "delivery" and r.get("destination") == "a"
            ]

        failed = wait_until(lambda: (f := failures_a()) and len(f) >= 4 and f, 30, "4 failures")
        gaps = [b - a for a, b in itertools.pairwise(failed)]
        assert sum(gaps[:3]) >= 1.2, gaps
        items_a = [i for i in node.outbox.items(job.id) if i.destination == "a"]
        assert all("cannot associate" in i.last_error for i in items_a), items_a

        # When A comes back on the same port
        pacs_a.start()

        # Then A gets each result exactly once and the job is done
        wait_until(lambda: node.jobs.get(job.id).state == "done", 30, f"done; {_jobs(node)}")
        received_a = pacs_a.receptions()
        assert sorted(received_a) == _uids(received_b)
        assert set(received_a.values()) == {1}, received_a
        assert len(pacs_b.received) == 2
    finally:
        node.stop()
        pacs_a.stop()
        pacs_b.stop()


def test_hung_destinations_do_not_starve_a_working_one(
    node_factory: NodeFactory, phantom_files: list[Path], tmp_path: Path
) -> None:
    # Given five destinations that accept TCP connections and never answer, and one PACS
    hung = [SilentListener() for _ in range(5)]
    pacs = FolderSCP("PACS", tmp_path / "pacs")
    pacs.start()
    remotes = [Remote(f"hung{i}", "HUNG", "127.0.0.1", h.port, 20.0) for i, h in enumerate(hung)]
    node = node_factory(
        remotes=[*remotes, Remote("pacs", "PACS", "127.0.0.1", pacs.port, 20.0)],
        destinations=(*(r.name for r in remotes), "pacs"),
        quiet_period_s=0.5,
        delivery=FAST,
    )
    try:
        # When a study is processed
        _send(node, phantom_files)
        wait_until(lambda: node.jobs.list_jobs(state="sending"), 60, f"results; {_jobs(node)}")
        ready = time.monotonic()

        # Then the working PACS has SEG and SR long before the hung ones time out (20 s)
        job = node.jobs.list_jobs()[0]

        def states() -> Counter[str]:
            return Counter(i.state for i in node.outbox.items(job.id))

        wait_until(lambda: states()["done"] == 2, 30, f"the working PACS; {states()}")
        waited = time.monotonic() - ready
        assert waited < 8.0, f"the working PACS waited {waited:.1f} s behind the hung ones"
        assert len(pacs.received) == 2
        assert states()["sending"] + states()["pending"] == 10, states()
    finally:
        for h in hung:
            h.close()  # resets the connections waiting in its backlog: the node stops at once
        node.stop(timeout=30)
        pacs.stop()


@pytest.mark.slow
@pytest.mark.parametrize("refusal", [0xA900, 0x0122], ids=["A900-mismatch", "0122-sop-class"])
def test_refusing_destination_dead_letters_and_jobs_retry_resends(
    refusal: int,
    node_factory: NodeFactory,
    phantom: Phantom,
    phantom_files: list[Path],
    tmp_path: Path,
) -> None:
    # Given a PACS that refuses every C-STORE with a permanent failure status
    scp = AnsweringSCP(refusal)
    data_dir = tmp_path / "node"
    node = node_factory(data_dir=data_dir, pacs_port=scp.port, quiet_period_s=0.5, delivery=FAST)
    cli_config = tmp_path / "cli.toml"
    cli_config.write_text(f'[node]\ndata_dir = "{data_dir}"\n')
    try:
        # When a study is processed and its results are sent
        _send(node, phantom_files)
        job = wait_until(
            lambda: next(iter(node.jobs.list_jobs(state="failed")), None),
            60,
            f"the job to fail; {_jobs(node)}",
        )

        # Then each result is dead-lettered at the first attempt with the PACS's status
        items = node.outbox.items(job.id)
        assert [(i.state, i.status, i.attempts) for i in items] == [("dead", refusal, 1)] * 2
        assert f"0x{refusal:04X}" in job.last_error
        assert len(scp.answered) == 2

        # And `dicomnode jobs` shows the failed job, its reason and the dead rows
        listing = jobs_cli(cli_config)
        line = next(ln for ln in listing.splitlines() if ln.strip("│ ").startswith(f"{job.id} "))
        assert "failed" in line and f"0x{refusal:04X}" in line, listing
        assert "outbox: dead 2" in listing, listing
        shown = jobs_cli(cli_config, "show", str(job.id))
        rows = [ln for ln in shown.splitlines() if "│ dead" in ln]
        assert len(rows) == 2 and all(f"0x{refusal:04X}" in r for r in rows), shown

        # When the PACS accepts again and the operator retries the job
        scp.status = 0x0000
        retried = jobs_cli(cli_config, "retry", str(job.id))
        assert f"job {job.id}: results will be sent again (sending)" in retried

        # Then the results are sent once more and the job is done
        wait_until(lambda: node.jobs.get(job.id).state == "done", 30, f"done; {_jobs(node)}")
        assert sorted(scp.accepted) == _uids([i.path for i in items])
        assert "done" in jobs_cli(cli_config, "list", "--state", "done")
    finally:
        node.stop()
        scp.stop()
