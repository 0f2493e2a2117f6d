"""The outbox: the only module that runs SQL on the ``outbox`` table.

One row per (job, destination, file).  An item moves along :data:`OUTBOX_TRANSITIONS`::

    pending -> sending -> done
                  |  -> pending (transient failure: back-off per the delivery schedule)
                  +  -> dead    (permanent rejection, or attempts exhausted)
    dead -> pending             (operator re-send)
    sending -> pending          (crash recovery: the answer never came)
    done -> pending             (a forced re-run of a done job sends its results again)

When no item of a job is open any more, the job is told (``sending -> done | failed``)
through :meth:`dicomnode.jobs.store.JobStore.delivery_finished`, in the same transaction.
Paths are stored relative to the data directory.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicomnode.config import RetrySettings
from dicomnode.db import Database
from dicomnode.errors import DicomNodeError
from dicomnode.jobs.store import DONE, FAILED, SENDING, JobState, JobStore
from dicomnode.outputs.layout import NOTIFICATION_SUFFIX
from dicomnode.states import assignments, check_transition


class OutboxState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    DEAD = "dead"


OUTBOX_TRANSITIONS: dict[OutboxState, frozenset[OutboxState]] = {
    OutboxState.PENDING: frozenset({OutboxState.SENDING}),
    OutboxState.SENDING: frozenset({OutboxState.DONE, OutboxState.PENDING, OutboxState.DEAD}),
    OutboxState.DONE: frozenset({OutboxState.PENDING}),
    OutboxState.DEAD: frozenset({OutboxState.PENDING}),
}


class RetryRefusedError(DicomNodeError):
    """An operator retry that would do harm or nothing (a job in progress, a done job)."""


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int
    destination: str
    path: Path
    state: OutboxState
    attempts: int
    next_attempt_at: float
    last_error: str
    status: int | None
    #: When the file was first delivered and the status then (kept across re-sends).
    delivered_at: float | None = None
    delivered_status: int | None = None


class Outbox:
    """Outbox operations; safe across threads and processes (one transaction each)."""

    def __init__(self, db: Database, jobs: JobStore, retry: RetrySettings) -> None:
        self.db = db
        self.jobs = jobs
        self.retry = retry

    def _item(self, r: sqlite3.Row) -> OutboxItem:
        fields = {k: r[k] for k in OutboxItem.__dataclass_fields__}
        fields["path"] = self.db.resolve(r["path"])
        fields["state"] = OutboxState(r["state"])
        return OutboxItem(**fields)

    def _move(
        self, conn: sqlite3.Connection, item_id: int, new: OutboxState, **fields: object
    ) -> int:
        """Move an item; returns its job id."""
        row = conn.execute("SELECT state, job_id FROM outbox WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise KeyError(f"no outbox item {item_id}")
        check_transition(OUTBOX_TRANSITIONS, f"outbox item {item_id}", OutboxState(row[0]), new)
        cols: dict[str, object] = {"state": str(new), "updated_at": time.time(), **fields}
        sets, values = assignments(cols)
        conn.execute(f"UPDATE outbox SET {sets} WHERE id = ?", (*values, item_id))
        return int(row["job_id"])

    # --- results in ----------------------------------------------------------------------

    def accept_results(
        self,
        job_id: int,
        outputs: Sequence[tuple[str, Path]],
        summary: str,
        note: str = "",
        triage_priority: str = "",
    ) -> JobState:
        """Queue a job's result files per destination and move the job on, atomically:
        ``running -> sending`` (or ``done`` when there is nothing to send).  ``note`` is kept
        as the job's error line (series that could not be processed); ``triage_priority``
        is recorded with the job."""
        now = time.time()
        with self.db.transaction() as conn:
            conn.executemany(
                """INSERT OR IGNORE INTO outbox (job_id, destination, path, state, updated_at)
                   VALUES (?, ?, ?, 'pending', ?)""",
                [(job_id, d, self.db.relative(p), now) for d, p in outputs],
            )
            wanted = {(d, self.db.relative(p)) for d, p in outputs}
            for row in conn.execute(
                "SELECT id, destination, path FROM outbox WHERE job_id = ? AND state = 'done'",
                (job_id,),
            ).fetchall():
                if (row["destination"], row["path"]) in wanted:  # a forced re-run: send again
                    self._move(conn, row["id"], OutboxState.PENDING, attempts=0, next_attempt_at=0)
            self.jobs.processed(
                conn,
                job_id,
                summary,
                to_deliver=bool(outputs),
                note=note,
                triage_priority=triage_priority,
            )
            return self.jobs.get(job_id, conn).state

    def retry_job(self, job_id: int, *, force: bool = False) -> JobState:
        """Operator retry.  A failed job whose results were dead-lettered is re-sent; any
        other failed job is re-run from scratch (its outbox rows dropped).

        A done job is refused unless ``force``: a forced re-run keeps the rows of the
        results it delivered (the record of what was sent; :meth:`accept_results` sends
        them again) and, should the re-run fail, the job goes back to done with the error
        (:meth:`job_failed`), because what it delivered still stands.  A job in progress
        (queued, running, sending) is refused.  Raises KeyError for an unknown job."""
        with self.db.transaction() as conn:
            job = self.jobs.get(job_id, conn)
            if job.state not in (FAILED, DONE):
                raise RetryRefusedError(f"job {job_id} is {job.state}: it is still in progress")
            if job.state == DONE and not force:
                raise RetryRefusedError(
                    f"job {job_id} is done (its results were delivered); "
                    "--force runs it again and sends its results again"
                )
            if job.state == DONE:
                self.jobs.requeue(conn, job_id)
                conn.execute("DELETE FROM outbox WHERE job_id = ? AND state != 'done'", (job_id,))
                return JobState.QUEUED
            dead = conn.execute(
                "SELECT id FROM outbox WHERE job_id = ? AND state = 'dead'", (job_id,)
            ).fetchall()
            if job.state == FAILED and dead:
                for row in dead:
                    self._move(conn, row["id"], OutboxState.PENDING, attempts=0, next_attempt_at=0)
                self.jobs.move(conn, job_id, SENDING, last_error="")
                return SENDING
            self.jobs.requeue(conn, job_id)
            conn.execute("DELETE FROM outbox WHERE job_id = ?", (job_id,))
            return JobState.QUEUED

    def job_failed(self, job_id: int, error: str, *, transient: bool) -> JobState:
        """A run of a job failed: back off or dead-letter (:meth:`JobStore.fail`); but a
        forced re-run of a done job (it still has delivered results) goes back to done,
        its error saying why the re-run failed: the earlier results stand."""
        job = self.jobs.get(job_id)
        if not (transient and job.attempts < self.jobs.retry.max_attempts):
            with self.db.transaction() as conn:
                delivered = int(
                    conn.execute(
                        "SELECT COUNT(*) FROM outbox WHERE job_id = ? AND state = 'done'",
                        (job_id,),
                    ).fetchone()[0]
                )
                if delivered:
                    note = f"re-run failed: {error}; the {delivered} file(s) delivered before stand"
                    self.jobs.move(conn, job_id, DONE, last_error=note[:2000])
                    return DONE
        return self.jobs.fail(job_id, error, transient=transient)

    # --- delivery ----------------------------------------------------------------------

    #: A due item: pending, its back-off over, and, for a notification (the ORU that
    #: references the SR), no result file of its job still waiting for its answer.
    _DUE = (
        "o.state = 'pending' AND o.next_attempt_at <= ? AND NOT (o.path LIKE ? AND EXISTS ("
        "SELECT 1 FROM outbox r WHERE r.job_id = o.job_id AND r.path NOT LIKE ? "
        "AND r.state IN ('pending', 'sending')))"
    )

    def _due_args(self) -> tuple[float, str, str]:
        pattern = f"%{NOTIFICATION_SUFFIX}"
        return (time.time(), pattern, pattern)

    def due_destinations(self) -> list[str]:
        rows = self.db.connect().execute(
            f"SELECT DISTINCT o.destination FROM outbox o WHERE {self._DUE}", self._due_args()
        )
        return [r[0] for r in rows]

    def take_due(self, destination: str, limit: int = 64) -> list[OutboxItem]:
        """Mark up to ``limit`` due items of one destination as sending and return them.

        A job's notification (HL7 ORU) is due only once every result file of the job has
        been answered (delivered or dead-lettered): the RIS never hears of an SR the PACS
        does not hold yet."""
        with self.db.transaction() as conn:
            rows = conn.execute(
                f"SELECT o.* FROM outbox o WHERE {self._DUE} AND o.destination = ? "
                "ORDER BY o.id LIMIT ?",
                (*self._due_args(), destination, limit),
            ).fetchall()
            for r in rows:
                self._move(conn, r["id"], OutboxState.SENDING, attempts=r["attempts"] + 1)
        return [self._item(r) for r in rows]

    def items(self, job_id: int) -> list[OutboxItem]:
        rows = self.db.connect().execute(
            "SELECT * FROM outbox WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [self._item(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.db.connect().execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        return {r[0]: r[1] for r in rows}

    def delivered(self, item_id: int, status: int) -> None:
        with self.db.transaction() as conn:
            job_id = self._move(conn, item_id, OutboxState.DONE, status=status, last_error="")
            conn.execute(
                "UPDATE outbox SET delivered_at = COALESCE(delivered_at, ?), "
                "delivered_status = COALESCE(delivered_status, ?) WHERE id = ?",
                (time.time(), status, item_id),
            )
            self._settle(conn, job_id)

    def delivery_failed(
        self, item_id: int, error: str, *, transient: bool, status: int | None = None
    ) -> OutboxState:
        """Back off (per item, with the destination's schedule) or dead-letter."""
        with self.db.transaction() as conn:
            attempts = int(
                conn.execute("SELECT attempts FROM outbox WHERE id = ?", (item_id,)).fetchone()[0]
            )
            if transient and attempts < self.retry.max_attempts:
                due = time.time() + self.retry.delay(attempts)
                self._move(
                    conn,
                    item_id,
                    OutboxState.PENDING,
                    next_attempt_at=due,
                    last_error=error,
                    status=status,
                )
                return OutboxState.PENDING
            if transient:
                error = f"{error} (gave up after {attempts} attempts)"
            job_id = self._move(conn, item_id, OutboxState.DEAD, last_error=error, status=status)
            self._settle(conn, job_id)
            return OutboxState.DEAD

    def _settle(self, conn: sqlite3.Connection, job_id: int) -> None:
        """Finish the job once none of its outbox rows is still open."""
        rows = conn.execute(
            "SELECT state, destination, last_error FROM outbox WHERE job_id = ?", (job_id,)
        ).fetchall()
        if any(r["state"] in ("pending", "sending") for r in rows):
            return
        dead = [r for r in rows if r["state"] == "dead"]
        error = (
            f"delivery to {dead[0]['destination']} failed: {dead[0]['last_error']}" if dead else ""
        )
        self.jobs.delivery_finished(conn, job_id, error)

    def recover(self, conn: sqlite3.Connection) -> int:
        """Inside the caller's transaction, after a crash: items in flight are re-sent."""
        rows = conn.execute("SELECT id FROM outbox WHERE state = 'sending'").fetchall()
        for row in rows:
            self._move(conn, row["id"], OutboxState.PENDING)
        return len(rows)
