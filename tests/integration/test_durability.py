"""Nothing acknowledged is lost: a restart between receive and processing, a PACS that is down.

The node is stopped and started again over the same data directory; the study must be
processed exactly once and its results delivered exactly once.  A destination that is down
keeps the job in ``sending`` with its outbox rows backing off, and the results arrive once
it is back on the same port.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app.node import Node
from dicomnode.config import RetrySettings
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom, write_phantom

from .peers import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    StoreSCP,
    describe_jobs,
    peer_environment,
    wait_until,
)

NodeFactory = Callable[..., Node]


def _send(node: Node, files: list[Path]) -> None:
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, "MODALITY")
    assert [r.status for r in results] == [0] * len(files), [r.error for r in results]


def _one_done_job(node: Node) -> bool:
    return [j.state for j in node.jobs.list_jobs()] == ["done"]


def _sop_classes(paths: list[Path]) -> list[str]:
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths)


def test_restart_between_receive_and_processing_processes_once(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom: Phantom,
    phantom_files: list[Path],
    tmp_path: Path,
) -> None:
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    data_dir = tmp_path / "node"
    # Given a study received by a node whose quiet period has not ended
    first = node_factory(data_dir=data_dir, quiet_period_s=3600.0, pacs_port=folder_scp.port)
    _send(first, phantom_files)
    study = first.index.study(study_uid)
    assert study is not None and study.state == "receiving"
    assert first.jobs.list_jobs() == []

    # When the node stops and starts again over the same data directory
    first.stop()
    second = node_factory(data_dir=data_dir, quiet_period_s=0.5, pacs_port=folder_scp.port)

    # Then the study is completed from the index, processed once and delivered once
    wait_until(lambda: _one_done_job(second), 60, f"one done job; {describe_jobs(second)}")
    assert _sop_classes(folder_scp.received) == sorted([SEG_CLASS, COMPREHENSIVE_3D_SR_CLASS])
    job = second.jobs.list_jobs()[0]
    assert job.attempts == 1 and job.generation == 1
    assert [i.state for i in second.outbox.items(job.id)] == ["done", "done"]
    assert len(second.index.latest_instances(study_uid)) == len(phantom_files)

    # And a further restart finds nothing left to do
    second.stop()
    third = node_factory(data_dir=data_dir, quiet_period_s=0.5, start=False)
    assert third.scheduler.tick() == []
    assert third.recover() == (0, 0)
    assert third.outbox.due_destinations() == []
    assert third.jobs.claim() is None
    assert len(folder_scp.received) == 2


@pytest.mark.peer
def test_results_wait_for_a_pacs_that_is_down(
    node_factory: NodeFactory,
    free_port: Callable[[], int],
    require_tool: Callable[[str], str],
    phantom_files: list[Path],
    tmp_path: Path,
) -> None:
    storescp = require_tool("storescp")
    pacs_port = free_port()
    pacs = StoreSCP(storescp, pacs_port, tmp_path / "pacs")
    # Given a node whose PACS is not running, with a fast delivery back-off
    node = node_factory(
        pacs_port=pacs_port,
        delivery=RetrySettings(max_attempts=1000, backoff_initial_s=0.2, backoff_max_s=0.4),
    )

    # When a study arrives and its results are ready
    _send(node, phantom_files)

    # Then the job waits in 'sending' while the outbox rows back off and retry
    def backing_off() -> bool:
        jobs = node.jobs.list_jobs()
        if [j.state for j in jobs] != ["sending"]:
            return False
        items = node.outbox.items(jobs[0].id)
        return len(items) == 2 and all(
            i.attempts >= 2 and i.state in ("pending", "sending") for i in items
        )

    wait_until(backing_off, 60, f"outbox rows retrying; {describe_jobs(node)}")
    job = node.jobs.list_jobs()[0]
    assert all("cannot associate" in i.last_error for i in node.outbox.items(job.id))
    assert node.outbox.counts().get("done", 0) == 0

    # And once the PACS is started on the same port, the results arrive and the job is done
    pacs.start()
    try:
        wait_until(lambda: _one_done_job(node), 30, f"job done; {describe_jobs(node)}")
        assert _sop_classes(pacs.files()) == sorted([SEG_CLASS, COMPREHENSIVE_3D_SR_CLASS])
        assert [i.state for i in node.outbox.items(job.id)] == ["done", "done"]
    finally:
        pacs.stop()


def test_results_waiting_for_delivery_survive_a_restart(
    node_factory: NodeFactory,
    free_port: Callable[[], int],
    phantom_files: list[Path],
    tmp_path: Path,
) -> None:
    pacs_port = free_port()
    data_dir = tmp_path / "node"
    fast = RetrySettings(max_attempts=1000, backoff_initial_s=0.2, backoff_max_s=0.4)
    # Given results waiting in the outbox because the PACS is down
    first = node_factory(data_dir=data_dir, pacs_port=pacs_port, delivery=fast)
    _send(first, phantom_files)
    wait_until(
        lambda: (
            [j.state for j in first.jobs.list_jobs()] == ["sending"]
            and all(i.attempts >= 1 for i in first.outbox.items(first.jobs.list_jobs()[0].id))
        ),
        60,
        f"the job to wait for delivery; {describe_jobs(first)}",
    )

    # When the node restarts and the PACS comes back on the same port
    first.stop()
    pacs = FolderSCP("PACS", tmp_path / "pacs", port=pacs_port)
    pacs.start()
    try:
        second = node_factory(data_dir=data_dir, pacs_port=pacs_port, delivery=fast)

        # Then the results are delivered exactly once, without running the job again
        wait_until(lambda: _one_done_job(second), 30, f"job done; {describe_jobs(second)}")
        assert _sop_classes(pacs.received) == sorted([SEG_CLASS, COMPREHENSIVE_3D_SR_CLASS])
        assert second.jobs.list_jobs()[0].attempts == 1
    finally:
        pacs.stop()


@pytest.mark.peer
def test_stop_finishes_the_association_in_flight(
    node_factory: NodeFactory, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    storescu = require_tool("storescu")
    echoscu = require_tool("echoscu")
    spec = PhantomSpec(rows=64, columns=64, slices=120, pixel_spacing=(5.6, 5.6), n_lesions=0)
    files = write_phantom(generate_phantom(spec), tmp_path / "long")
    node = node_factory(quiet_period_s=3600.0, pacs_port=9)
    port = node.port
    # Given storescu in the middle of sending a 120-instance study
    proc = subprocess.Popen(
        [storescu, "-aec", "DICOMNODE", "-R", "127.0.0.1", str(port), *map(str, files)],
        env=peer_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: node.scp.counters.stored >= 5, 30, "the first instances")

        # When the node is stopped (what SIGTERM does)
        stopping = threading.Thread(target=node.stop)
        stopping.start()
        stored_when_stopped = node.scp.counters.stored

        # Then the association in flight completes: every instance acknowledged and indexed
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopping.join(60)
    assert not stopping.is_alive()
    assert stored_when_stopped < len(files), "storescu finished before the stop began"
    assert proc.returncode == 0, output
    study = node.index.latest_instances(str(dcmread(files[0]).StudyInstanceUID))
    assert len(study) == len(files) == node.scp.counters.stored
    # And no new association is accepted
    echo = subprocess.run(
        [echoscu, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        capture_output=True,
        env=peer_environment(),
        timeout=30,
    )
    assert echo.returncode != 0
