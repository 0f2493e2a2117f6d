"""Completeness: quiet period per study, several associations, restart, late arrivals."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicomnode.config import RetrySettings, Route
from dicomnode.db import Database
from dicomnode.jobs.scheduler import Scheduler
from dicomnode.jobs.store import JobStore
from dicomnode.routing.rules import parse_rule
from dicomnode.spool.index import Index
from dicomnode.spool.store import Spool
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

ROUTES = (Route("ct", "lesion", ("pacs",), parse_rule([{"Modality": "CT"}])),)
MR_ONLY = (Route("mr", "lesion", ("pacs",), parse_rule([{"Modality": "MR"}])),)


@pytest.fixture
def study(tmp_path: Path) -> list[bytes]:
    files = write_phantom(
        generate_phantom(PhantomSpec(rows=32, columns=32, slices=6, lesions=())), tmp_path / "in"
    )
    return [p.read_bytes() for p in files]


def make(
    tmp_path: Path, routes: tuple[Route, ...] = ROUTES, rerun: bool = True, quiet: float = 30.0
) -> tuple[Spool, JobStore, Scheduler]:
    index = Index(Database(tmp_path / "data"))
    jobs = JobStore(index.db, RetrySettings())
    spool = Spool(tmp_path / "data", index, min_free_bytes=0, rerun_late=rerun)
    return spool, jobs, Scheduler(index, jobs, routes, quiet_period_s=quiet)


def test_study_over_several_associations_with_short_gaps_is_one_job(
    tmp_path: Path, study: list[bytes]
) -> None:
    spool, queue, scheduler = make(tmp_path)
    start = time.time()
    for i, data in enumerate(study):
        spool.store(data, calling_ae=f"ASSOC{i}", calling_host="127.0.0.1")
        # Gaps shorter than the quiet period: nothing completes.
        assert scheduler.tick(now=time.time() + 10) == []
    assert scheduler.tick(now=start + 5) == []
    created = scheduler.tick(now=time.time() + 31)
    assert len(created) == 1
    job = queue.get(created[0])
    assert len(job.series_uids) == 1 and job.generation == 1


def test_timer_survives_restart(tmp_path: Path, study: list[bytes]) -> None:
    spool, _, _ = make(tmp_path)
    for data in study:
        spool.store(data, calling_ae="PACS", calling_host="127.0.0.1")
    # A new process: new index connection, new scheduler, same data directory.
    _, queue, scheduler = make(tmp_path)
    assert scheduler.tick() == []
    assert len(scheduler.tick(now=time.time() + 31)) == 1
    assert queue.counts() == {"queued": 1}


def test_late_instance_reruns_with_new_generation(tmp_path: Path, study: list[bytes]) -> None:
    spool, queue, scheduler = make(tmp_path)
    for data in study[:-1]:
        spool.store(data, calling_ae="PACS", calling_host="127.0.0.1")
    (first,) = scheduler.tick(now=time.time() + 31)
    spool.store(study[-1], calling_ae="PACS", calling_host="127.0.0.1")
    (second,) = scheduler.tick(now=time.time() + 31)
    assert queue.get(second).generation == queue.get(first).generation + 1


def test_late_instance_with_ignore_policy_creates_no_job(
    tmp_path: Path, study: list[bytes]
) -> None:
    spool, queue, scheduler = make(tmp_path, rerun=False)
    for data in study[:-1]:
        spool.store(data, calling_ae="PACS", calling_host="127.0.0.1")
    scheduler.tick(now=time.time() + 31)
    spool.store(study[-1], calling_ae="PACS", calling_host="127.0.0.1")
    assert scheduler.tick(now=time.time() + 31) == []
    assert len(queue.list_jobs()) == 1


def test_study_no_route_matches_is_recorded_as_ignored(tmp_path: Path, study: list[bytes]) -> None:
    spool, queue, scheduler = make(tmp_path, routes=MR_ONLY)
    for data in study:
        spool.store(data, calling_ae="PACS", calling_host="127.0.0.1")
    assert scheduler.tick(now=time.time() + 31) == []
    (record,) = scheduler.index.studies()
    assert record.state == "ignored"
    assert "Modality == 'MR' fails" in record.note
    assert queue.list_jobs() == []


def test_unreadable_study_stays_receiving_with_its_error_and_is_retried(
    tmp_path: Path, study: list[bytes]
) -> None:
    """Given a study whose spooled files cannot be read, when the quiet period ends, then
    it is not "ignored, no route matched": it keeps receiving, records the real cause,
    backs off, and is routed once the files are readable again."""
    spool, queue, scheduler = make(tmp_path, quiet=0.0)
    for data in study:
        spool.store(data, calling_ae="PACS", calling_host="127.0.0.1")
    paths = spool.index.instance_paths(spool.index.studies()[0].study_instance_uid)
    for p in paths:
        p.rename(p.with_suffix(".hidden"))
    assert scheduler.tick() == []
    (record,) = scheduler.index.studies()
    assert record.state == "receiving" and record.attempts == 1
    assert "cannot read the study's headers" in record.last_error
    assert "No such file" in record.last_error or "FileNotFound" in record.last_error
    assert record.next_attempt_at > time.time()  # backing off
    assert scheduler.tick() == []  # not due yet: no second attempt
    assert scheduler.index.studies()[0].attempts == 1
    for p in paths:
        p.with_suffix(".hidden").rename(p)
    assert len(scheduler.tick(now=record.next_attempt_at + 0.1)) == 1
    (record,) = scheduler.index.studies()
    assert record.state == "complete" and record.last_error == "" and record.attempts == 0
    assert queue.counts() == {"queued": 1}
