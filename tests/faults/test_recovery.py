"""What a restart after a crash does to work in progress (``Node.recover``).

A job that was running at every one of ``max_attempts`` crashes may be what kills the
worker: it is dead-lettered, not run forever.  A study still receiving gets its quiet period
restarted, so the time the node was down does not complete it half received.
"""

from __future__ import annotations

import time
from pathlib import Path

from dicomnode.app.node import Node
from dicomnode.config import Config, NodeSettings, RetrySettings
from dicomnode.jobs.scheduler import Scheduler
from dicomnode.jobs.store import FAILED, QUEUED


def _node(data_dir: Path) -> Node:
    retry = RetrySettings(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05)
    return Node(Config(node=NodeSettings(data_dir=data_dir), jobs=retry, delivery=retry))


def test_a_job_interrupted_max_attempts_times_is_dead_lettered(tmp_path: Path) -> None:
    node = _node(tmp_path)
    with node.db.transaction() as conn:
        job_id = node.jobs.create(conn, "1.2.3", "ct", 1, ["1.2.3.4"], ["pacs"])
    # Given a job that was running at two crashes: it is re-queued each time
    for _ in range(2):
        assert node.jobs.claim() is not None
        assert node.recover() == (1, 0)
        assert node.jobs.get(job_id).state == QUEUED  # type: ignore[arg-type]

    # When it is running at a third crash
    assert node.jobs.claim() is not None
    node.recover()

    # Then it is failed with the reason, and an operator can still retry it
    job = node.jobs.get(job_id)  # type: ignore[arg-type]
    assert job.state == FAILED and job.attempts == 3
    assert "interrupted 3 times" in job.last_error
    assert node.outbox.retry_job(job.id) == QUEUED


def test_a_study_receiving_at_a_crash_gets_a_full_quiet_period_after_restart(
    tmp_path: Path,
) -> None:
    node = _node(tmp_path)
    index = node.index
    long_ago = time.time() - 3600
    # Given a study whose last instance arrived an hour ago, before the node went down
    with node.db.transaction() as conn:
        conn.execute(
            "INSERT INTO studies (study_instance_uid, state, first_received_at, "
            "last_received_at, calling_ae, calling_host) VALUES ('1.2.3', 'receiving', ?, ?, "
            "'PACS', '127.0.0.1')",
            (long_ago, long_ago),
        )
    scheduler = Scheduler(index, node.jobs, [], quiet_period_s=30.0)

    # When the node starts again
    before = time.time()
    node.recover()

    # Then the study waits a whole quiet period from now before it is completed
    assert index.quiet_studies(30.0) == []
    assert scheduler.tick() == []
    assert index.quiet_studies(30.0, now=before + 31.0) == ["1.2.3"]
