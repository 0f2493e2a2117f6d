"""Job and outbox state machine: transitions, back-off, dead-letter, recovery, retry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicomnode.config import RetrySettings
from dicomnode.jobs.queue import (
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    SENDING,
    JobQueue,
    TransitionError,
)
from dicomnode.spool.index import Index


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    fast = RetrySettings(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05)
    return JobQueue(Index(tmp_path), fast, fast)


def new_job(queue: JobQueue, study: str = "1.2.3", generation: int = 1) -> int:
    with queue.index.transaction() as conn:
        job_id = queue.create(conn, study, "ct", generation, ["1.2.3.4"], ["pacs"])
    assert job_id is not None
    return job_id


def test_job_is_created_once_per_study_route_generation(queue: JobQueue) -> None:
    first = new_job(queue)
    with queue.index.transaction() as conn:
        assert queue.create(conn, "1.2.3", "ct", 1, ["x"], ["pacs"]) is None
    assert new_job(queue, generation=2) != first


def test_happy_path_queued_running_sending_done(queue: JobQueue, tmp_path: Path) -> None:
    job_id = new_job(queue)
    job = queue.claim()
    assert job is not None and job.id == job_id and job.state == RUNNING and job.attempts == 1
    assert queue.claim() is None
    queue.finish_processing(
        job_id, [("pacs", tmp_path / "a.dcm"), ("pacs", tmp_path / "b.dcm")], "{}"
    )
    assert queue.get(job_id).state == SENDING
    items = queue.take_due("pacs")
    assert len(items) == 2
    queue.delivered(items[0].id, 0)
    assert queue.get(job_id).state == SENDING
    queue.delivered(items[1].id, 0)
    assert queue.get(job_id).state == DONE


def test_transient_errors_back_off_then_dead_letter(queue: JobQueue) -> None:
    job_id = new_job(queue)
    for attempt in (1, 2):
        job = queue.claim()
        assert job is not None and job.attempts == attempt
        assert queue.fail(job_id, "busy", transient=True) == QUEUED
        assert queue.claim() is None  # backing off
        time.sleep(0.06)
    assert queue.claim() is not None
    assert queue.fail(job_id, "busy", transient=True) == FAILED
    assert "gave up after 3 attempts" in queue.get(job_id).last_error


def test_permanent_error_dead_letters_at_once_and_retry_requeues(queue: JobQueue) -> None:
    job_id = new_job(queue)
    queue.claim()
    assert queue.fail(job_id, "mixed orientations", transient=False) == FAILED
    assert queue.retry_job(job_id) == QUEUED
    job = queue.claim()
    assert job is not None and job.attempts == 1


def test_dead_delivery_fails_job_and_retry_resends(queue: JobQueue, tmp_path: Path) -> None:
    job_id = new_job(queue)
    queue.claim()
    queue.finish_processing(job_id, [("pacs", tmp_path / "a.dcm")], "{}")
    (item,) = queue.take_due("pacs")
    assert queue.delivery_failed(item.id, "0xA900", transient=False, status=0xA900) == "dead"
    job = queue.get(job_id)
    assert job.state == FAILED and "0xA900" in job.last_error
    assert queue.retry_job(job_id) == SENDING
    (again,) = queue.take_due("pacs")
    queue.delivered(again.id, 0)
    assert queue.get(job_id).state == DONE


def test_transient_delivery_failure_backs_off_per_item(queue: JobQueue, tmp_path: Path) -> None:
    job_id = new_job(queue)
    queue.claim()
    queue.finish_processing(job_id, [("pacs", tmp_path / "a.dcm")], "{}")
    (item,) = queue.take_due("pacs")
    assert queue.delivery_failed(item.id, "refused", transient=True) == "pending"
    assert queue.take_due("pacs") == []
    time.sleep(0.03)
    assert len(queue.take_due("pacs")) == 1


def test_recover_requeues_running_jobs_and_sending_items(queue: JobQueue, tmp_path: Path) -> None:
    a, b = new_job(queue, "1.1"), new_job(queue, "1.2")
    queue.claim()
    queue.finish_processing(a, [("pacs", tmp_path / "a.dcm")], "{}")
    queue.take_due("pacs")
    queue.claim()  # b is running when the "crash" happens
    assert queue.recover() == (1, 1)
    assert queue.get(b).state == QUEUED
    assert len(queue.take_due("pacs")) == 1


def test_transitions_outside_the_table_are_refused(queue: JobQueue) -> None:
    job_id = new_job(queue)
    with pytest.raises(TransitionError), queue.index.transaction() as conn:
        queue._move(conn, job_id, DONE)


def test_jobs_of_a_dead_worker_are_requeued_with_backoff(queue: JobQueue) -> None:
    job_id = new_job(queue)
    job = queue.claim()
    assert job is not None
    assert queue.release_worker(os.getpid() + 1) == 0  # someone else's pid: nothing
    assert queue.release_worker(os.getpid()) == 1
    requeued = queue.get(job_id)
    assert requeued.state == QUEUED and "died" in requeued.last_error


def test_a_base_exception_from_a_native_library_does_not_end_the_worker(
    queue: JobQueue,
) -> None:
    from dicomnode.jobs.worker import run_one

    class Panic(BaseException):  # what pyo3 raises when a Rust decoder panics
        pass

    def process(job: object) -> tuple[list[tuple[str, Path]], str]:
        raise Panic("decoder panicked")

    job_id = new_job(queue)
    assert run_one(queue, process) is not None
    job = queue.get(job_id)
    assert job.state == QUEUED and "Panic" in job.last_error
