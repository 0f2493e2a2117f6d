"""Durable jobs: the only module that runs SQL on the ``jobs`` table.

A job is one (study, route, generation): a small row of ids, never data.  Its states and
the only transitions allowed between them are :data:`TRANSITIONS`::

    queued -> running -> sending -> done
                 |          |
                 +-> queued (transient error, back-off)     sending -> failed (delivery)
                 +-> done   (nothing to deliver)
                 +-> failed (permanent error or attempts exhausted: dead-letter)
    failed | done -> queued      (operator re-run)
    failed -> sending            (operator re-send of dead-lettered results)

Queued jobs are claimed by priority, then age (:meth:`JobStore.claim`): a job's score is
its request priority (0 routine, 1 HIGH, 2 STAT) plus the time it has waited divided by
``aging_s``, and the highest score goes first (ties: the oldest).  A STAT study overtakes
routine ones, and a routine job that has waited long enough overtakes a new STAT one.

Every state has a way out: jobs left ``running`` by a crash are re-queued at start-up
(:meth:`JobStore.recover`), or dead-lettered once they have been interrupted
``max_attempts`` times.  Methods that take a ``conn`` run inside the caller's
transaction, so that other owners (the scheduler's study update, the outbox) change their
tables atomically with the job.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum

from dicomnode.config import RetrySettings
from dicomnode.db import Database
from dicomnode.states import assignments, check_transition


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


QUEUED, RUNNING, SENDING, DONE, FAILED = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SENDING,
    JobState.DONE,
    JobState.FAILED,
)
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    QUEUED: frozenset({RUNNING}),
    RUNNING: frozenset({QUEUED, SENDING, DONE, FAILED}),
    SENDING: frozenset({DONE, FAILED}),
    DONE: frozenset({QUEUED}),
    FAILED: frozenset({QUEUED, SENDING}),
}


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    route: str
    generation: int
    series_uids: tuple[str, ...]
    destinations: tuple[str, ...]
    state: JobState
    attempts: int
    next_attempt_at: float
    last_error: str
    created_at: float
    updated_at: float
    finished_at: float | None
    summary: str
    #: The study's request priority: 0 routine, 1 HIGH, 2 STAT (see :data:`REQUEST_RANKS`).
    request_priority: int = 0
    #: The triage priority of the results (urgent, review, routine); "" before processing.
    triage_priority: str = ""


#: Claim rank of each request priority (the configuration's names).
REQUEST_RANKS = {"ROUTINE": 0, "HIGH": 1, "STAT": 2}


def _job(r: sqlite3.Row) -> Job:
    fields = {k: r[k] for k in Job.__dataclass_fields__}
    fields["series_uids"] = tuple(json.loads(r["series_uids"]))
    fields["destinations"] = tuple(json.loads(r["destinations"]))
    fields["state"] = JobState(r["state"])
    return Job(**fields)


class JobStore:
    """Job operations; safe across threads and processes (one transaction each)."""

    def __init__(self, db: Database, retry: RetrySettings) -> None:
        self.db = db
        self.retry = retry

    def move(self, conn: sqlite3.Connection, job_id: int, new: JobState, **fields: object) -> None:
        """Inside the caller's transaction: move a job along an edge of :data:`TRANSITIONS`."""
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        check_transition(TRANSITIONS, f"job {job_id}", JobState(row["state"]), new)
        now = time.time()
        cols: dict[str, object] = {"state": str(new), "updated_at": now, **fields}
        if new in (DONE, FAILED):
            cols["finished_at"] = now
        sets, values = assignments(cols)
        conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values, job_id))

    def create(
        self,
        conn: sqlite3.Connection,
        study_uid: str,
        route: str,
        generation: int,
        series_uids: list[str],
        destinations: list[str],
        inputs_digest: str = "",
        request_priority: int = 0,
    ) -> int | None:
        """Insert a queued job inside the caller's transaction (None if it exists).

        ``inputs_digest`` identifies the instances the job reads (see
        :meth:`ran_with_inputs`); ``request_priority`` is its claim rank
        (:data:`REQUEST_RANKS`)."""
        now = time.time()
        cur = conn.execute(
            """INSERT OR IGNORE INTO jobs (study_instance_uid, route, generation, series_uids,
               destinations, state, created_at, updated_at, inputs_digest, request_priority)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                study_uid,
                route,
                generation,
                json.dumps(series_uids),
                json.dumps(destinations),
                str(QUEUED),
                now,
                now,
                inputs_digest,
                request_priority,
            ),
        )
        return cur.lastrowid if cur.rowcount else None

    def ran_with_inputs(
        self, conn: sqlite3.Connection, study_uid: str, route: str, inputs_digest: str
    ) -> int | None:
        """The id of an earlier job of this study and route over exactly these inputs (a
        study re-sent without new images), or None."""
        row = conn.execute(
            "SELECT id FROM jobs WHERE study_instance_uid = ? AND route = ? "
            "AND inputs_digest = ? AND inputs_digest != '' ORDER BY id DESC LIMIT 1",
            (study_uid, route, inputs_digest),
        ).fetchone()
        return None if row is None else int(row[0])

    def claim(self, aging_s: float = 600.0) -> Job | None:
        """Atomically take the due queued job with the highest score and mark it running.

        Score: request priority + seconds waited / ``aging_s`` (ties: the oldest)."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE state = ? AND next_attempt_at <= ? "
                "ORDER BY request_priority + (? - created_at) / ? DESC, id LIMIT 1",
                (str(QUEUED), now, now, aging_s),
            ).fetchone()
            if row is None:
                return None
            self.move(
                conn, row["id"], RUNNING, attempts=row["attempts"] + 1, worker_pid=os.getpid()
            )
        return self.get(row["id"])

    def get(self, job_id: int, conn: sqlite3.Connection | None = None) -> Job:
        row = (
            (conn or self.db.connect())
            .execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        if row is None:
            raise KeyError(f"no job {job_id}")
        return _job(row)

    def list_jobs(self, state: JobState | str | None = None, limit: int = 200) -> list[Job]:
        sql = "SELECT * FROM jobs"
        args: tuple[str, ...] = ()
        if state:
            sql, args = sql + " WHERE state = ?", (str(state),)
        rows = self.db.connect().execute(sql + f" ORDER BY id DESC LIMIT {int(limit)}", args)
        return [_job(r) for r in rows]

    def for_study(self, study_uid: str) -> list[Job]:
        rows = self.db.connect().execute(
            "SELECT * FROM jobs WHERE study_instance_uid = ? ORDER BY id", (study_uid,)
        )
        return [_job(r) for r in rows]

    def earlier_generations(self, job: Job) -> list[Job]:
        """Jobs of the same study and route, of earlier generations, that produced results
        (the reports this job's report supersedes)."""
        rows = self.db.connect().execute(
            "SELECT * FROM jobs WHERE study_instance_uid = ? AND route = ? AND generation < ? "
            "AND state IN ('sending', 'done') ORDER BY generation",
            (job.study_instance_uid, job.route, job.generation),
        )
        return [_job(r) for r in rows]

    def processed(
        self,
        conn: sqlite3.Connection,
        job_id: int,
        summary: str,
        *,
        to_deliver: bool,
        note: str = "",
        triage_priority: str = "",
    ) -> None:
        """Inside the caller's transaction: running -> sending (or done: nothing to send);
        ``note`` says what was not processed, ``triage_priority`` what the results call for."""
        self.move(
            conn,
            job_id,
            SENDING if to_deliver else DONE,
            summary=summary,
            last_error=note,
            triage_priority=triage_priority,
        )

    def delivery_finished(self, conn: sqlite3.Connection, job_id: int, error: str) -> None:
        """Inside the caller's transaction: every result answered; sending -> done | failed.

        A job no longer ``sending`` (an operator re-ran it meanwhile) is left alone."""
        job = self.get(job_id, conn)
        if job.state != SENDING:
            return
        if error:
            self.move(conn, job_id, FAILED, last_error=error)
        else:
            self.move(conn, job_id, DONE, last_error=job.last_error)

    def fail(self, job_id: int, error: str, *, transient: bool) -> JobState:
        """Back off and re-queue a transient failure, dead-letter the rest; returns the state."""
        with self.db.transaction() as conn:
            attempts = self.get(job_id, conn).attempts
            if transient and attempts < self.retry.max_attempts:
                due = time.time() + self.retry.delay(attempts)
                self.move(conn, job_id, QUEUED, last_error=error, next_attempt_at=due)
                return QUEUED
            reason = error if not transient else f"{error} (gave up after {attempts} attempts)"
            self.move(conn, job_id, FAILED, last_error=reason)
            return FAILED

    def requeue(self, conn: sqlite3.Connection, job_id: int) -> None:
        """Inside the caller's transaction: operator re-run from scratch."""
        self.move(conn, job_id, QUEUED, attempts=0, next_attempt_at=0, last_error="")

    def release_worker(self, pid: int) -> int:
        """A worker process died: its running jobs go back to the queue (with back-off), or
        to dead-letter once they have used their attempts (it may be what kills it)."""
        released = 0
        with self.db.transaction() as conn:
            for row in conn.execute(
                "SELECT id, attempts FROM jobs WHERE state = ? AND worker_pid = ?",
                (str(RUNNING), pid),
            ).fetchall():
                error = f"worker process {pid} died while running the job"
                if row["attempts"] >= self.retry.max_attempts:
                    self.move(conn, row["id"], FAILED, last_error=error + "; gave up")
                else:
                    due = time.time() + self.retry.delay(row["attempts"])
                    self.move(conn, row["id"], QUEUED, last_error=error, next_attempt_at=due)
                released += 1
        return released

    def recover(self, conn: sqlite3.Connection) -> int:
        """Inside the caller's transaction, after a crash: running jobs go back to queued.

        A job that was interrupted ``max_attempts`` times (it may be what kills the worker)
        is dead-lettered instead of being run forever.  Returns the jobs re-queued."""
        for row in conn.execute(
            "SELECT id, attempts FROM jobs WHERE state = ? AND attempts >= ?",
            (str(RUNNING), self.retry.max_attempts),
        ).fetchall():
            self.move(
                conn,
                row["id"],
                FAILED,
                last_error=f"interrupted {row['attempts']} times while running "
                "(the worker crashed or the node was killed); gave up",
            )
        rows = conn.execute("SELECT id FROM jobs WHERE state = ?", (str(RUNNING),)).fetchall()
        for row in rows:
            self.move(conn, row["id"], QUEUED)
        return len(rows)

    def counts(self) -> dict[str, int]:
        rows = self.db.connect().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {r[0]: r[1] for r in rows}
