"""Durable jobs and their outbox, in the node's SQLite index.

A job is one (study, route, generation): a small row of ids, never data.  Its states and
the only transitions allowed between them are the table :data:`TRANSITIONS`::

    queued -> running -> sending -> done
                 |          |
                 +-> queued (transient error, back-off)     sending -> failed (delivery)
                 +-> failed (permanent error or attempts exhausted: dead-letter)
    failed -> queued | sending   (operator retry)

The outbox holds one row per (job, destination, file).  Every state has a way out: jobs
left ``running`` by a crash are re-queued at start-up, outbox rows left ``sending`` go back
to ``pending``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import RetrySettings
from dicomnode.spool.index import Index

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    generation INTEGER NOT NULL,
    series_uids TEXT NOT NULL,
    destinations TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    summary TEXT NOT NULL DEFAULT '',
    worker_pid INTEGER,
    UNIQUE (study_instance_uid, route, generation)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    status INTEGER,
    updated_at REAL NOT NULL,
    UNIQUE (job_id, destination, path)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, destination, next_attempt_at);
"""

QUEUED, RUNNING, SENDING, DONE, FAILED = "queued", "running", "sending", "done", "failed"
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING}),
    RUNNING: frozenset({QUEUED, SENDING, DONE, FAILED}),
    SENDING: frozenset({DONE, FAILED}),
    DONE: frozenset({QUEUED}),
    FAILED: frozenset({QUEUED, SENDING}),
}


class TransitionError(RuntimeError):
    """A job was asked to move along an edge that :data:`TRANSITIONS` does not have."""


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    route: str
    generation: int
    series_uids: tuple[str, ...]
    destinations: tuple[str, ...]
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str
    created_at: float
    updated_at: float
    finished_at: float | None
    summary: str


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int
    destination: str
    path: Path
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str
    status: int | None


def _job(r: sqlite3.Row) -> Job:
    return Job(
        id=r["id"],
        study_instance_uid=r["study_instance_uid"],
        route=r["route"],
        generation=r["generation"],
        series_uids=tuple(json.loads(r["series_uids"])),
        destinations=tuple(json.loads(r["destinations"])),
        state=r["state"],
        attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"],
        last_error=r["last_error"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        finished_at=r["finished_at"],
        summary=r["summary"],
    )


def _item(r: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        id=r["id"],
        job_id=r["job_id"],
        destination=r["destination"],
        path=Path(r["path"]),
        state=r["state"],
        attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"],
        last_error=r["last_error"],
        status=r["status"],
    )


class JobQueue:
    """Job and outbox operations; safe across threads and processes (one tx each)."""

    def __init__(self, index: Index, retry: RetrySettings, delivery_retry: RetrySettings) -> None:
        self.index = index
        self.retry = retry
        self.delivery_retry = delivery_retry
        index.ensure_schema(SCHEMA)
        columns = {r[1] for r in index.connect().execute("PRAGMA table_info(jobs)")}
        if "worker_pid" not in columns:  # index created by an earlier version
            index.connect().execute("ALTER TABLE jobs ADD COLUMN worker_pid INTEGER")

    # --- jobs ------------------------------------------------------------------------

    def _move(self, conn: sqlite3.Connection, job_id: int, new: str, **fields: object) -> None:
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        if new not in TRANSITIONS[row["state"]]:
            raise TransitionError(f"job {job_id}: {row['state']} -> {new} is not allowed")
        now = time.time()
        cols = {"state": new, "updated_at": now, **fields}
        if new in (DONE, FAILED):
            cols["finished_at"] = now
        sets = ", ".join(f"{k} = ?" for k in cols)
        conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*cols.values(), job_id))

    def create(
        self,
        conn: sqlite3.Connection,
        study_uid: str,
        route: str,
        generation: int,
        series_uids: list[str],
        destinations: list[str],
    ) -> int | None:
        """Insert a queued job inside the caller's transaction (None if it exists)."""
        now = time.time()
        cur = conn.execute(
            """INSERT OR IGNORE INTO jobs (study_instance_uid, route, generation, series_uids,
               destinations, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                study_uid,
                route,
                generation,
                json.dumps(series_uids),
                json.dumps(destinations),
                QUEUED,
                now,
                now,
            ),
        )
        return cur.lastrowid if cur.rowcount else None

    def claim(self) -> Job | None:
        """Atomically take the oldest due queued job and mark it running."""
        with self.index.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE state = ? AND next_attempt_at <= ? ORDER BY id LIMIT 1",
                (QUEUED, time.time()),
            ).fetchone()
            if row is None:
                return None
            self._move(
                conn, row["id"], RUNNING, attempts=row["attempts"] + 1, worker_pid=os.getpid()
            )
        return self.get(row["id"])

    def get(self, job_id: int) -> Job:
        row = self.index.connect().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        return _job(row)

    def list_jobs(self, state: str | None = None, limit: int = 200) -> list[Job]:
        sql = "SELECT * FROM jobs"
        args: tuple[str, ...] = ()
        if state:
            sql, args = sql + " WHERE state = ?", (state,)
        rows = self.index.connect().execute(sql + f" ORDER BY id DESC LIMIT {int(limit)}", args)
        return [_job(r) for r in rows]

    def finish_processing(self, job_id: int, outputs: list[tuple[str, Path]], summary: str) -> None:
        """Record the produced files per destination and move running -> sending."""
        now = time.time()
        with self.index.transaction() as conn:
            for destination, path in outputs:
                conn.execute(
                    """INSERT OR IGNORE INTO outbox (job_id, destination, path, state, updated_at)
                       VALUES (?, ?, ?, 'pending', ?)""",
                    (job_id, destination, str(path), now),
                )
            self._move(conn, job_id, SENDING if outputs else DONE, summary=summary, last_error="")

    def fail(self, job_id: int, error: str, *, transient: bool) -> str:
        """Back off and re-queue a transient failure, dead-letter the rest; returns the state."""
        with self.index.transaction() as conn:
            row = conn.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            attempts = int(row["attempts"])
            if transient and attempts < self.retry.max_attempts:
                due = time.time() + self.retry.delay(attempts)
                self._move(conn, job_id, QUEUED, last_error=error, next_attempt_at=due)
                return QUEUED
            reason = error if not transient else f"{error} (gave up after {attempts} attempts)"
            self._move(conn, job_id, FAILED, last_error=reason)
            return FAILED

    def retry_job(self, job_id: int) -> str:
        """Operator retry of a failed (or done) job: re-send if it has outputs, else re-run."""
        with self.index.transaction() as conn:
            job = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if job is None:
                raise KeyError(f"no job {job_id}")
            dead = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE job_id = ? AND state = 'dead'", (job_id,)
            ).fetchone()[0]
            if job["state"] == FAILED and dead:
                conn.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0 "
                    "WHERE job_id = ? AND state = 'dead'",
                    (job_id,),
                )
                self._move(conn, job_id, SENDING, last_error="")
                return SENDING
            conn.execute("DELETE FROM outbox WHERE job_id = ?", (job_id,))
            self._move(conn, job_id, QUEUED, attempts=0, next_attempt_at=0, last_error="")
            return QUEUED

    def release_worker(self, pid: int) -> int:
        """A worker process died: its running jobs go back to the queue (with back-off), or
        to dead-letter once they have used their attempts (it may be what kills it)."""
        released = 0
        with self.index.transaction() as conn:
            for row in conn.execute(
                "SELECT id, attempts FROM jobs WHERE state = ? AND worker_pid = ?", (RUNNING, pid)
            ).fetchall():
                error = f"worker process {pid} died while running the job"
                if row["attempts"] >= self.retry.max_attempts:
                    self._move(conn, row["id"], FAILED, last_error=error + "; gave up")
                else:
                    due = time.time() + self.retry.delay(row["attempts"])
                    self._move(conn, row["id"], QUEUED, last_error=error, next_attempt_at=due)
                released += 1
        return released

    def recover(self) -> tuple[int, int]:
        """After a crash: running jobs go back to queued, sending outbox rows to pending.

        A job that was interrupted ``max_attempts`` times (it may be what kills the worker)
        is dead-lettered instead of being run forever.  Studies still receiving get their
        quiet period restarted: while the node was down their senders could not send, so
        the time it was down must not complete them half received.
        """
        now = time.time()
        with self.index.transaction() as conn:
            for row in conn.execute(
                "SELECT id, attempts FROM jobs WHERE state = ? AND attempts >= ?",
                (RUNNING, self.retry.max_attempts),
            ).fetchall():
                self._move(
                    conn,
                    row["id"],
                    FAILED,
                    last_error=f"interrupted {row['attempts']} times while running "
                    "(the worker crashed or the node was killed); gave up",
                )
            jobs = conn.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?",
                (QUEUED, now, RUNNING),
            ).rowcount
            conn.execute(
                "UPDATE studies SET last_received_at = ? "
                "WHERE state = 'receiving' AND last_received_at < ?",
                (now, now),
            )
            items = conn.execute(
                "UPDATE outbox SET state = 'pending' WHERE state = 'sending'"
            ).rowcount
        return jobs, items

    def purgeable_studies(self, completed_before: float) -> list[tuple[str, list[int]]]:
        """Studies complete before the cutoff whose every job is done (results delivered).

        Returns (study UID, job ids).  Studies with a job still open or failed are kept."""
        rows = (
            self.index.connect()
            .execute(
                """SELECT s.study_instance_uid FROM studies s
               WHERE s.state IN ('complete', 'ignored') AND s.completed_at < ?
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid =
                               s.study_instance_uid AND j.state != 'done')""",
                (completed_before,),
            )
            .fetchall()
        )
        out = []
        for (study,) in rows:
            ids = [
                r[0]
                for r in self.index.connect().execute(
                    "SELECT id FROM jobs WHERE study_instance_uid = ?", (study,)
                )
            ]
            out.append((study, ids))
        return out

    def counts(self) -> dict[str, int]:
        rows = self.index.connect().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {r[0]: r[1] for r in rows}

    # --- outbox ----------------------------------------------------------------------

    def due_destinations(self) -> list[str]:
        rows = self.index.connect().execute(
            "SELECT DISTINCT destination FROM outbox WHERE state = 'pending' "
            "AND next_attempt_at <= ?",
            (time.time(),),
        )
        return [r[0] for r in rows]

    def take_due(self, destination: str, limit: int = 64) -> list[OutboxItem]:
        """Mark up to ``limit`` due items of one destination as sending and return them."""
        with self.index.transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM outbox WHERE state = 'pending' AND destination = ? "
                "AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (destination, time.time(), limit),
            ).fetchall()
            conn.executemany(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1 WHERE id = ?",
                [(r["id"],) for r in rows],
            )
        return [_item(r) for r in rows]

    def items(self, job_id: int) -> list[OutboxItem]:
        rows = self.index.connect().execute(
            "SELECT * FROM outbox WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [_item(r) for r in rows]

    def outbox_counts(self) -> dict[str, int]:
        rows = self.index.connect().execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        return {r[0]: r[1] for r in rows}

    def delivered(self, item_id: int, status: int) -> None:
        with self.index.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET state = 'done', status = ?, last_error = '', updated_at = ? "
                "WHERE id = ?",
                (status, time.time(), item_id),
            )
            self._settle(conn, item_id)

    def delivery_failed(
        self, item_id: int, error: str, *, transient: bool, status: int | None = None
    ) -> str:
        """Back off (per item, with the destination's schedule) or dead-letter."""
        with self.index.transaction() as conn:
            row = conn.execute("SELECT attempts FROM outbox WHERE id = ?", (item_id,)).fetchone()
            attempts = int(row["attempts"])
            if transient and attempts < self.delivery_retry.max_attempts:
                due = time.time() + self.delivery_retry.delay(attempts)
                conn.execute(
                    "UPDATE outbox SET state = 'pending', next_attempt_at = ?, last_error = ?, "
                    "status = ?, updated_at = ? WHERE id = ?",
                    (due, error, status, time.time(), item_id),
                )
                return "pending"
            if transient:
                error = f"{error} (gave up after {attempts} attempts)"
            conn.execute(
                "UPDATE outbox SET state = 'dead', last_error = ?, status = ?, updated_at = ? "
                "WHERE id = ?",
                (error, status, time.time(), item_id),
            )
            self._settle(conn, item_id)
            return "dead"

    def _settle(self, conn: sqlite3.Connection, item_id: int) -> None:
        """Finish the item's job once none of its outbox rows is still open."""
        job_id = conn.execute("SELECT job_id FROM outbox WHERE id = ?", (item_id,)).fetchone()[0]
        rows = conn.execute(
            "SELECT state, destination, last_error FROM outbox WHERE job_id = ?", (job_id,)
        ).fetchall()
        if any(r["state"] in ("pending", "sending") for r in rows):
            return
        state = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        if state != SENDING:
            return
        dead = [r for r in rows if r["state"] == "dead"]
        if dead:
            error = f"delivery to {dead[0]['destination']} failed: {dead[0]['last_error']}"
            self._move(conn, job_id, FAILED, last_error=error)
        else:
            self._move(conn, job_id, DONE)
