"""Job and outbox state machines: transitions, back-off, dead-letter, recovery, retry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicomnode.app.worker import WorkerContext, run_one
from dicomnode.audit import AuditLog
from dicomnode.config import Config, NodeSettings, RetrySettings
from dicomnode.db import Database
from dicomnode.delivery.store import Outbox
from dicomnode.errors import DicomNodeError, TransitionError
from dicomnode.jobs.store import DONE, FAILED, QUEUED, RUNNING, SENDING, JobStore
from dicomnode.spool.index import Index

#: Back-off long enough that a busy machine cannot outlast it between two calls.
FAST = RetrySettings(max_attempts=3, backoff_initial_s=1.0, backoff_max_s=1.0)


class Stores:
    def __init__(self, data_dir: Path) -> None:
        self.db = Database(data_dir)
        self.jobs = JobStore(self.db, FAST)
        self.outbox = Outbox(self.db, self.jobs, FAST)

    def recover(self) -> tuple[int, int]:
        with self.db.transaction() as conn:
            return self.jobs.recover(conn), self.outbox.recover(conn)


@pytest.fixture
def s(tmp_path: Path) -> Stores:
    return Stores(tmp_path)


def new_job(s: Stores, study: str = "1.2.3", generation: int = 1) -> int:
    with s.db.transaction() as conn:
        job_id = s.jobs.create(conn, study, "ct", generation, ["1.2.3.4"], ["pacs"])
    assert job_id is not None
    return job_id


def test_job_is_created_once_per_study_route_generation(s: Stores) -> None:
    first = new_job(s)
    with s.db.transaction() as conn:
        assert s.jobs.create(conn, "1.2.3", "ct", 1, ["x"], ["pacs"]) is None
    assert new_job(s, generation=2) != first


def test_happy_path_queued_running_sending_done(s: Stores, tmp_path: Path) -> None:
    job_id = new_job(s)
    job = s.jobs.claim()
    assert job is not None and job.id == job_id and job.state == RUNNING and job.attempts == 1
    assert s.jobs.claim() is None
    s.outbox.accept_results(
        job_id, [("pacs", tmp_path / "a.dcm"), ("pacs", tmp_path / "b.dcm")], "{}"
    )
    assert s.jobs.get(job_id).state == SENDING
    items = s.outbox.take_due("pacs")
    assert len(items) == 2
    s.outbox.delivered(items[0].id, 0)
    assert s.jobs.get(job_id).state == SENDING
    s.outbox.delivered(items[1].id, 0)
    assert s.jobs.get(job_id).state == DONE


def test_transient_errors_back_off_then_dead_letter(s: Stores) -> None:
    job_id = new_job(s)
    for attempt in (1, 2):
        job = s.jobs.claim()
        assert job is not None and job.attempts == attempt
        assert s.jobs.fail(job_id, "busy", transient=True) == QUEUED
        assert s.jobs.claim() is None  # backing off
        time.sleep(1.1)
    assert s.jobs.claim() is not None
    assert s.jobs.fail(job_id, "busy", transient=True) == FAILED
    assert "gave up after 3 attempts" in s.jobs.get(job_id).last_error


def test_permanent_error_dead_letters_at_once_and_retry_requeues(s: Stores) -> None:
    job_id = new_job(s)
    s.jobs.claim()
    assert s.jobs.fail(job_id, "mixed orientations", transient=False) == FAILED
    assert s.outbox.retry_job(job_id) == QUEUED
    job = s.jobs.claim()
    assert job is not None and job.attempts == 1


def test_dead_delivery_fails_job_and_retry_resends(s: Stores, tmp_path: Path) -> None:
    job_id = new_job(s)
    s.jobs.claim()
    s.outbox.accept_results(job_id, [("pacs", tmp_path / "a.dcm")], "{}")
    (item,) = s.outbox.take_due("pacs")
    assert s.outbox.delivery_failed(item.id, "0xA900", transient=False, status=0xA900) == "dead"
    job = s.jobs.get(job_id)
    assert job.state == FAILED and "0xA900" in job.last_error
    assert s.outbox.retry_job(job_id) == SENDING
    (again,) = s.outbox.take_due("pacs")
    s.outbox.delivered(again.id, 0)
    assert s.jobs.get(job_id).state == DONE


def test_transient_delivery_failure_backs_off_per_item(s: Stores, tmp_path: Path) -> None:
    job_id = new_job(s)
    s.jobs.claim()
    s.outbox.accept_results(job_id, [("pacs", tmp_path / "a.dcm")], "{}")
    (item,) = s.outbox.take_due("pacs")
    assert s.outbox.delivery_failed(item.id, "refused", transient=True) == "pending"
    assert s.outbox.take_due("pacs") == []
    time.sleep(1.1)
    assert len(s.outbox.take_due("pacs")) == 1


def test_recover_requeues_running_jobs_and_sending_items(s: Stores, tmp_path: Path) -> None:
    a, b = new_job(s, "1.1"), new_job(s, "1.2")
    s.jobs.claim()
    s.outbox.accept_results(a, [("pacs", tmp_path / "a.dcm")], "{}")
    s.outbox.take_due("pacs")
    s.jobs.claim()  # b is running when the "crash" happens
    assert s.recover() == (1, 1)
    assert s.jobs.get(b).state == QUEUED
    assert len(s.outbox.take_due("pacs")) == 1


def test_transitions_outside_the_table_are_refused(s: Stores) -> None:
    job_id = new_job(s)
    with pytest.raises(TransitionError), s.db.transaction() as conn:
        s.jobs.move(conn, job_id, DONE)
    assert issubclass(TransitionError, DicomNodeError)


def test_jobs_of_a_dead_worker_are_requeued_with_backoff(s: Stores) -> None:
    job_id = new_job(s)
    job = s.jobs.claim()
    assert job is not None
    assert s.jobs.release_worker(os.getpid() + 1) == 0  # someone else's pid: nothing
    assert s.jobs.release_worker(os.getpid()) == 1
    requeued = s.jobs.get(job_id)
    assert requeued.state == QUEUED and "died" in requeued.last_error


def test_a_base_exception_from_a_native_library_does_not_end_the_worker(
    s: Stores, tmp_path: Path
) -> None:
    class Panic(BaseException):  # what pyo3 raises when a Rust decoder panics
        pass

    def process(job: object, destinations: list[str]) -> tuple[list[tuple[str, Path]], str]:
        raise Panic("decoder panicked")

    job_id = new_job(s)
    config = Config(node=NodeSettings(data_dir=tmp_path))
    ctx = WorkerContext(config, Index(s.db), s.jobs, s.outbox, AuditLog(None))
    assert run_one(ctx, process) is not None
    job = s.jobs.get(job_id)
    assert job.state == QUEUED and "Panic" in job.last_error


def test_a_notification_waits_for_the_results_it_references(s: Stores, tmp_path: Path) -> None:
    """The ORU for the RIS goes out only once the SR it references was answered."""
    job_id = new_job(s)
    s.jobs.claim()
    s.outbox.accept_results(
        job_id, [("pacs", tmp_path / "a-sr.dcm"), ("ris", tmp_path / "ct-oru.hl7")], "{}"
    )
    assert s.outbox.due_destinations() == ["pacs"]
    assert s.outbox.take_due("ris") == []
    (result,) = s.outbox.take_due("pacs")
    assert s.outbox.take_due("ris") == []  # still in flight
    s.outbox.delivery_failed(result.id, "refused", transient=True)
    assert s.outbox.take_due("ris") == []  # waiting for its retry
    time.sleep(1.1)
    (result,) = s.outbox.take_due("pacs")
    s.outbox.delivered(result.id, 0)
    (notification,) = s.outbox.take_due("ris")
    assert notification.path.name == "ct-oru.hl7"


def test_a_forced_rerun_keeps_the_record_of_what_was_delivered(s: Stores, tmp_path: Path) -> None:
    # Given a done job whose SR was delivered with status 0x0000
    job_id = new_job(s)
    s.jobs.claim()
    s.outbox.accept_results(job_id, [("pacs", tmp_path / "a-sr.dcm")], "{}")
    (item,) = s.outbox.take_due("pacs")
    s.outbox.delivered(item.id, 0)
    first = s.outbox.items(job_id)[0]
    assert first.delivered_at is not None and first.delivered_status == 0
    # When an operator forces a re-run whose re-send is refused for good
    assert s.outbox.retry_job(job_id, force=True) == QUEUED
    s.jobs.claim()
    s.outbox.accept_results(job_id, [("pacs", tmp_path / "a-sr.dcm")], "{}")
    (again,) = s.outbox.take_due("pacs")
    s.outbox.delivery_failed(again.id, "0xA900", transient=False, status=0xA900)
    # Then the item is dead now, and still records its first delivery
    (after,) = s.outbox.items(job_id)
    assert after.state == "dead" and after.status == 0xA900
    assert (after.delivered_at, after.delivered_status) == (first.delivered_at, 0)
