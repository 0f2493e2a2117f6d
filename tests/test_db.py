"""The versioned schema: a data directory made by the first release is upgraded in place.

``tests/fixtures/datadir_v0`` was written by the release at commit 54153aa (no
``user_version``, absolute paths under ``/tmp/legacy/data``): four studies, one job done,
one sending with results pending, one failed with results dead-lettered, one queued.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from dicomnode.config import RetrySettings
from dicomnode.db import SCHEMA_VERSION, Database, relative_to_data_dir
from dicomnode.delivery.store import Outbox, OutboxState
from dicomnode.errors import SpoolError
from dicomnode.jobs.store import DONE, FAILED, QUEUED, RUNNING, SENDING, JobStore
from dicomnode.spool.index import Index, StudyState

FIXTURE = Path(__file__).parent / "fixtures" / "datadir_v0"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    data = tmp_path / "moved" / "data"
    shutil.copytree(FIXTURE, data)
    return data


def test_first_release_data_dir_is_upgraded_with_its_queued_work(legacy: Path) -> None:
    # Given a data directory of the first release, copied somewhere else
    with sqlite3.connect(legacy / "index.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    # When this release opens it
    db = Database(legacy)
    # Then the schema is current and every table kept its rows
    assert db.version == SCHEMA_VERSION
    index, jobs = Index(db), JobStore(db, RetrySettings())
    outbox = Outbox(db, jobs, RetrySettings())
    assert jobs.counts() == {"done": 1, "sending": 1, "failed": 1, "queued": 1}
    assert outbox.counts() == {"done": 4, "pending": 4, "dead": 4}
    studies = index.studies()
    assert len(studies) == 4 and {s.state for s in studies} == {StudyState.COMPLETE}
    # and every stored path resolves inside the new location
    for study in studies:
        instances = index.latest_instances(study.study_instance_uid)
        assert len(instances) == 10
        assert all(i.path.is_file() and legacy in i.path.parents for i in instances)
    for job in jobs.list_jobs():
        for item in outbox.items(job.id):
            assert item.path.is_file() and legacy in item.path.parents, item.path
            assert item.path.name.endswith((f"-{job.route}-seg.dcm", f"-{job.route}-sr.dcm"))


def test_upgraded_work_moves_on(legacy: Path) -> None:
    db = Database(legacy)
    jobs = JobStore(db, RetrySettings())
    outbox = Outbox(db, jobs, RetrySettings())
    by_state = {j.state: j for j in jobs.list_jobs()}
    # The queued job is claimed and can finish
    claimed = jobs.claim()
    assert claimed is not None and claimed.id == by_state[QUEUED].id
    assert claimed.state == RUNNING
    # The pending results of the sending job are delivered and the job is done
    for destination in ("pacs", "archive"):
        for item in outbox.take_due(destination):
            if item.job_id == by_state[SENDING].id:
                outbox.delivered(item.id, 0)
    assert jobs.get(by_state[SENDING].id).state == DONE
    # The failed job's dead-lettered results can be re-sent by an operator
    assert outbox.retry_job(by_state[FAILED].id) == SENDING
    items = outbox.items(by_state[FAILED].id)
    assert {i.state for i in items} == {OutboxState.PENDING}


def test_migration_runs_once_and_is_a_no_op_afterwards(legacy: Path) -> None:
    first = Database(legacy)
    before = [tuple(r) for r in first.connect().execute("SELECT id, path FROM outbox")]
    second = Database(legacy)
    assert second.migrate() == SCHEMA_VERSION
    assert [tuple(r) for r in second.connect().execute("SELECT id, path FROM outbox")] == before


def test_a_new_data_dir_gets_the_current_schema(tmp_path: Path) -> None:
    assert Database(tmp_path).version == SCHEMA_VERSION


def test_a_data_dir_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    Database(tmp_path).connect().execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SpoolError, match="newer than this release"):
        Database(tmp_path)


def test_relative_paths_from_moved_and_current_data_dirs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert relative_to_data_dir(f"{data}/spool/1/2/3.dcm", data, "spool") == "spool/1/2/3.dcm"
    assert relative_to_data_dir("/old/place/spool/1/2/3.dcm", data, "spool") == "spool/1/2/3.dcm"
    assert relative_to_data_dir("results/job-1/a.dcm", data, "results") == "results/job-1/a.dcm"
