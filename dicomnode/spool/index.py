"""The index of received instances and studies: the only module that runs SQL on them.

A study moves through :class:`StudyState` along the edges of :data:`STUDY_TRANSITIONS`
only::

    receiving -> complete   (quiet period over, routes matched, jobs created)
    receiving -> ignored    (quiet period over, no route matched)
    complete | ignored -> receiving   (a late instance, late_arrivals = "rerun":
                                       a new generation)

A study whose routing could not be decided (a spooled header that cannot be read) stays
``receiving`` with its error recorded and is tried again after a back-off.  Paths are
stored relative to the data directory (:meth:`dicomnode.db.Database.relative`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicomnode.db import Database
from dicomnode.states import check_transition


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    IGNORED = "ignored"


STUDY_TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.COMPLETE, StudyState.IGNORED}),
    StudyState.COMPLETE: frozenset({StudyState.RECEIVING}),
    StudyState.IGNORED: frozenset({StudyState.RECEIVING}),
}


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    version: int
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    sha256: str
    size: int
    calling_ae: str
    received_at: float
    drives: bool
    content_sha256: str | None


@dataclass(frozen=True)
class StudyRecord:
    study_instance_uid: str
    state: StudyState
    generation: int
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    calling_ae: str
    calling_host: str
    note: str
    attempts: int
    next_attempt_at: float
    last_error: str


@dataclass(frozen=True)
class InstanceHeader:
    """The UIDs a received instance is filed under (read without decoding it)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class NewInstance:
    """An instance to index, its file already durable at ``path`` (data-dir relative)."""

    header: InstanceHeader
    version: int
    path: str
    #: The data set's digest; None when no other version was there to compare it with
    #: (computed from the file if one comes later).
    content_sha256: str | None
    drives: bool
    sha256: str
    size: int
    calling_ae: str
    calling_host: str


@dataclass(frozen=True)
class QueryRow:
    """One object a query can find (``query_instances``): a received instance (its newest
    version; ``source_id`` is its ``instances`` row) or a result file of the node
    (``job_id`` set; ``source_id`` is the file's modification time in ns).  ``path`` is
    relative to the data directory; ``attributes`` maps keyword -> value as text."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    job_id: int | None
    source_id: int
    attributes: dict[str, str]


class Index:
    """Instances, studies and their query attributes in the node's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _instance(self, r: sqlite3.Row) -> InstanceRecord:
        fields = {k: r[k] for k in InstanceRecord.__dataclass_fields__}
        fields["path"] = self.db.resolve(r["path"])
        fields["drives"] = bool(r["drives"])
        return InstanceRecord(**fields)

    @staticmethod
    def _study(r: sqlite3.Row) -> StudyRecord:
        fields = {k: r[k] for k in StudyRecord.__dataclass_fields__}
        fields["state"] = StudyState(r["state"])
        return StudyRecord(**fields)

    # --- instances -------------------------------------------------------------------

    def latest_instances(self, study_uid: str, *, driving: bool = False) -> list[InstanceRecord]:
        """The newest version of every instance of a study (``driving``: only those that
        drive processing: images, not the node's own results)."""
        rows = (
            self.db.connect()
            .execute(
                """SELECT * FROM instances i WHERE study_instance_uid = ? AND version = (
                   SELECT MAX(version) FROM instances j
                   WHERE j.sop_instance_uid = i.sop_instance_uid)"""
                + (" AND drives = 1" if driving else "")
                + " ORDER BY series_instance_uid, id",
                (study_uid,),
            )
            .fetchall()
        )
        return [self._instance(r) for r in rows]

    def instance_paths(self, study_uid: str) -> list[Path]:
        """Every stored file (all versions) of a study."""
        rows = self.db.connect().execute(
            "SELECT path FROM instances WHERE study_instance_uid = ?", (study_uid,)
        )
        return [self.db.resolve(r[0]) for r in rows]

    def instance_versions(self, sop_instance_uid: str) -> list[InstanceRecord]:
        rows = (
            self.db.connect()
            .execute(
                "SELECT * FROM instances WHERE sop_instance_uid = ? ORDER BY version",
                (sop_instance_uid,),
            )
            .fetchall()
        )
        return [self._instance(r) for r in rows]

    def instance_count(self, study_uid: str, conn: sqlite3.Connection | None = None) -> int:
        """How many distinct instances (SOP Instance UIDs, any version, driving or not) of
        a study the node holds: what a sender's NumberOfStudyRelatedInstances counts."""
        row = (
            (conn or self.db.connect())
            .execute(
                "SELECT COUNT(DISTINCT sop_instance_uid) FROM instances "
                "WHERE study_instance_uid = ?",
                (study_uid,),
            )
            .fetchone()
        )
        return int(row[0])

    def add_instance(self, new: NewInstance, *, rerun_late: bool, durable: bool = True) -> None:
        """Index an instance and note the activity on its study, in one transaction.

        A late instance for a complete or ignored study starts a new generation
        (``rerun_late``) or is only recorded.  Raises ``sqlite3.IntegrityError`` when the
        version was indexed meanwhile by another process.  ``durable=False``: the receive
        log holds the instance until the next :meth:`checkpoint` (see
        :meth:`dicomnode.db.Database.transaction`).
        """
        now = time.time()
        with self.db.transaction(durable=durable) as conn:
            conn.execute(
                """INSERT INTO instances (sop_instance_uid, version, sop_class_uid,
                   study_instance_uid, series_instance_uid, transfer_syntax_uid, path, sha256,
                   size, calling_ae, calling_host, received_at, content_sha256, drives)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    new.header.sop_instance_uid,
                    new.version,
                    new.header.sop_class_uid,
                    new.header.study_instance_uid,
                    new.header.series_instance_uid,
                    new.header.transfer_syntax_uid,
                    new.path,
                    new.sha256,
                    new.size,
                    new.calling_ae,
                    new.calling_host,
                    now,
                    new.content_sha256,
                    int(new.drives),
                ),
            )
            self._note_arrival(conn, new, now, rerun_late)

    def _note_arrival(
        self, conn: sqlite3.Connection, new: NewInstance, now: float, rerun_late: bool
    ) -> None:
        """A study's state after an instance arrived.

        Only instances that drive processing (images, not the node's own results) start a
        study's quiet period, keep it open or re-open it; the others are only stored.  A
        late image re-opens a complete study as a new generation (``rerun_late``) and an
        ignored one in its generation (it has no results to supersede)."""
        uid = new.header.study_instance_uid
        found = conn.execute(
            "SELECT state FROM studies WHERE study_instance_uid = ?", (uid,)
        ).fetchone()
        if found is None:
            state, note = (
                (StudyState.RECEIVING, "")
                if new.drives
                else (StudyState.IGNORED, "only objects that do not drive processing so far")
            )
            conn.execute(
                """INSERT INTO studies (study_instance_uid, state, generation, first_received_at,
                   last_received_at, completed_at, calling_ae, calling_host, note)
                   VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)""",
                (
                    uid,
                    str(state),
                    now,
                    now,
                    None if new.drives else now,
                    new.calling_ae,
                    new.calling_host,
                    note,
                ),
            )
            return
        if not new.drives:
            return
        old = StudyState(found["state"])
        if old == StudyState.RECEIVING:
            conn.execute(
                "UPDATE studies SET last_received_at = ?, calling_ae = ?, calling_host = ? "
                "WHERE study_instance_uid = ?",
                (now, new.calling_ae, new.calling_host, uid),
            )
        elif rerun_late or old == StudyState.IGNORED:
            self._move(conn, uid, StudyState.RECEIVING)
            conn.execute(
                "UPDATE studies SET generation = generation + ?, last_received_at = ?, "
                "completed_at = NULL, calling_ae = ?, calling_host = ?, attempts = 0, "
                "next_attempt_at = 0, last_error = '', note = '' WHERE study_instance_uid = ?",
                (int(old == StudyState.COMPLETE), now, new.calling_ae, new.calling_host, uid),
            )
        else:
            conn.execute(
                "UPDATE studies SET last_received_at = ? WHERE study_instance_uid = ?",
                (now, uid),
            )

    def checkpoint(self, owner: str, instances: int) -> None:
        """A durable commit: syncs the WAL, so every earlier ``durable=False`` commit of any
        connection is durable too (the receive log's checkpoint)."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO receive_checkpoints (owner, checkpointed_at, instances) "
                "VALUES (?, ?, ?)",
                (owner, time.time(), instances),
            )

    def last_checkpoint(self, owners: set[str]) -> float:
        """The oldest of these receive logs' last checkpoints (0: one never had one):
        instances indexed since may not be durable yet."""
        conn = self.db.connect()
        times = []
        for owner in owners:
            row = conn.execute(
                "SELECT checkpointed_at FROM receive_checkpoints WHERE owner = ?", (owner,)
            ).fetchone()
            times.append(float(row[0]) if row is not None else 0.0)
        return min(times, default=0.0)

    def instances_received_since(self, since: float) -> list[InstanceRecord]:
        rows = self.db.connect().execute(
            "SELECT * FROM instances WHERE received_at >= ? ORDER BY received_at", (since,)
        )
        return [self._instance(r) for r in rows]

    def remove_instance(self, sop_instance_uid: str, version: int) -> None:
        """Forget an instance whose file recovery found torn (it was never acknowledged)."""
        with self.db.transaction() as conn:
            conn.execute(
                "DELETE FROM instances WHERE sop_instance_uid = ? AND version = ?",
                (sop_instance_uid, version),
            )

    def touch_study(self, study_uid: str) -> None:
        """A duplicate still counts as activity for the study's quiet period."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE studies SET last_received_at = ? WHERE study_instance_uid = ? "
                "AND state = 'receiving'",
                (time.time(), study_uid),
            )

    # --- studies ---------------------------------------------------------------------

    def study(self, study_uid: str, conn: sqlite3.Connection | None = None) -> StudyRecord | None:
        row = (
            (conn or self.db.connect())
            .execute("SELECT * FROM studies WHERE study_instance_uid = ?", (study_uid,))
            .fetchone()
        )
        return None if row is None else self._study(row)

    def studies(self, state: StudyState | None = None) -> list[StudyRecord]:
        sql = "SELECT * FROM studies"
        args: tuple[str, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (str(state),)
        return [self._study(r) for r in self.db.connect().execute(sql + " ORDER BY rowid", args)]

    def study_counts(self) -> dict[str, int]:
        rows = self.db.connect().execute("SELECT state, COUNT(*) FROM studies GROUP BY state")
        return {r[0]: r[1] for r in rows}

    def quiet_studies(self, quiet_period_s: float, now: float | None = None) -> list[str]:
        """Studies still receiving whose last instance is older than the quiet period
        (and whose routing, if it failed before, is due to be tried again)."""
        now = time.time() if now is None else now
        rows = (
            self.db.connect()
            .execute(
                "SELECT study_instance_uid FROM studies WHERE state = 'receiving' "
                "AND last_received_at <= ? AND next_attempt_at <= ? ORDER BY last_received_at",
                (now - quiet_period_s, now),
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    def _move(self, conn: sqlite3.Connection, study_uid: str, new: StudyState) -> None:
        row = conn.execute(
            "SELECT state FROM studies WHERE study_instance_uid = ?", (study_uid,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no study {study_uid}")
        check_transition(STUDY_TRANSITIONS, f"study {study_uid}", StudyState(row["state"]), new)
        conn.execute(
            "UPDATE studies SET state = ? WHERE study_instance_uid = ?", (str(new), study_uid)
        )

    def finish_study(
        self, conn: sqlite3.Connection, study_uid: str, state: StudyState, note: str
    ) -> None:
        """Inside the caller's transaction: receiving -> complete | ignored."""
        self._move(conn, study_uid, state)
        conn.execute(
            "UPDATE studies SET completed_at = ?, note = ?, attempts = 0, last_error = '' "
            "WHERE study_instance_uid = ?",
            (time.time(), note[:2000], study_uid),
        )

    def routing_failed(self, study_uid: str, error: str, backoff: Callable[[int], float]) -> float:
        """Record why a study could not be routed; it is tried again after
        ``backoff(attempts)`` seconds, which is returned."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT attempts FROM studies WHERE study_instance_uid = ?", (study_uid,)
            ).fetchone()
            attempts = 1 + (0 if row is None else int(row[0]))
            delay = backoff(attempts)
            conn.execute(
                "UPDATE studies SET attempts = ?, next_attempt_at = ?, last_error = ? "
                "WHERE study_instance_uid = ? AND state = 'receiving'",
                (attempts, time.time() + delay, error[:2000], study_uid),
            )
        return delay

    def restart_quiet_periods(self, conn: sqlite3.Connection, now: float) -> int:
        """After a restart: studies still receiving get a full quiet period again (their
        senders could not send while the node was down)."""
        return conn.execute(
            "UPDATE studies SET last_received_at = ? "
            "WHERE state = 'receiving' AND last_received_at < ?",
            (now, now),
        ).rowcount

    def finished_before(self, cutoff: float) -> list[str]:
        """Studies complete or ignored before ``cutoff`` (candidates for retention)."""
        rows = self.db.connect().execute(
            "SELECT study_instance_uid FROM studies WHERE state IN ('complete', 'ignored') "
            "AND completed_at < ? ORDER BY completed_at",
            (cutoff,),
        )
        return [r[0] for r in rows]

    def remove_study(self, study_uid: str) -> None:
        """Delete a study's index rows (its files are the spool's to delete first)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_uid,))
            conn.execute("DELETE FROM studies WHERE study_instance_uid = ?", (study_uid,))
            conn.execute("DELETE FROM query_instances WHERE study_instance_uid = ?", (study_uid,))

    # --- query attributes (dicomnode.spool.query) ------------------------------------

    def instances_without_query_row(self, limit: int = 100000) -> list[tuple[int, InstanceRecord]]:
        """(row id, record) of the newest version of each received instance whose query
        attributes are not recorded yet."""
        rows = (
            self.db.connect()
            .execute(
                """SELECT * FROM instances i WHERE version = (
                   SELECT MAX(version) FROM instances j
                   WHERE j.sop_instance_uid = i.sop_instance_uid)
                   AND NOT EXISTS (SELECT 1 FROM query_instances q
                   WHERE q.job_id IS NULL AND q.source_id = i.id) ORDER BY id LIMIT ?""",
                (limit,),
            )
            .fetchall()
        )
        return [(int(r["id"]), self._instance(r)) for r in rows]

    def put_query_row(self, row: QueryRow) -> None:
        """Record (or replace) the query attributes of a received instance or result file."""
        origin = "received" if row.job_id is None else "result"
        with self.db.transaction() as conn:
            if row.job_id is not None:
                conn.execute("DELETE FROM query_instances WHERE path = ?", (row.path,))
            conn.execute(
                """INSERT OR REPLACE INTO query_instances (sop_instance_uid, origin,
                   study_instance_uid, series_instance_uid, sop_class_uid,
                   transfer_syntax_uid, path, job_id, source_id, attributes)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    row.sop_instance_uid,
                    origin,
                    row.study_instance_uid,
                    row.series_instance_uid,
                    row.sop_class_uid,
                    row.transfer_syntax_uid,
                    row.path,
                    row.job_id,
                    row.source_id,
                    json.dumps(row.attributes, separators=(",", ":")),
                ),
            )

    def result_query_files(self) -> dict[str, int]:
        """Result files with query rows: path -> modification time (ns) when read."""
        rows = self.db.connect().execute(
            "SELECT path, source_id FROM query_instances WHERE job_id IS NOT NULL"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def remove_query_rows_of_files(self, paths: list[str]) -> None:
        with self.db.transaction() as conn:
            conn.executemany(
                "DELETE FROM query_instances WHERE job_id IS NOT NULL AND path = ?",
                [(p,) for p in paths],
            )

    def query_rows(self, uids: dict[str, list[str]]) -> list[QueryRow]:
        """Query rows, narrowed to the UIDs given per keyword (StudyInstanceUID,
        SeriesInstanceUID, SOPInstanceUID), newest first."""
        columns = {
            "StudyInstanceUID": "study_instance_uid",
            "SeriesInstanceUID": "series_instance_uid",
            "SOPInstanceUID": "sop_instance_uid",
        }
        where, args = [], []
        for keyword, values in uids.items():
            where.append(f"{columns[keyword]} IN ({', '.join('?' * len(values))})")
            args.extend(values)
        sql = "SELECT * FROM query_instances"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.db.connect().execute(sql + " ORDER BY rowid DESC", args).fetchall()
        return [
            QueryRow(
                sop_instance_uid=r["sop_instance_uid"],
                study_instance_uid=r["study_instance_uid"],
                series_instance_uid=r["series_instance_uid"],
                sop_class_uid=r["sop_class_uid"],
                transfer_syntax_uid=r["transfer_syntax_uid"],
                path=r["path"],
                job_id=r["job_id"],
                source_id=int(r["source_id"]),
                attributes=json.loads(r["attributes"]),
            )
            for r in rows
        ]
