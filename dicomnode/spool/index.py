"""The SQLite (WAL) index: instances and studies, shared by every process of a node.

Each thread or process opens its own connection (:meth:`Index.connect`).  The database is
in WAL mode with ``synchronous=FULL``, so a committed row survives a crash or power loss
before the C-STORE response goes out.  Other layers add their tables with
:meth:`Index.ensure_schema`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    calling_host TEXT NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (sop_instance_uid, version)
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'complete', 'ignored')),
    generation INTEGER NOT NULL DEFAULT 1,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    completed_at REAL,
    calling_ae TEXT NOT NULL,
    calling_host TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state, last_received_at);
"""


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


@dataclass(frozen=True)
class StudyRecord:
    study_instance_uid: str
    state: str
    generation: int
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    calling_ae: str
    calling_host: str
    note: str


class Index:
    """Opens connections to the node's SQLite index at ``data_dir/index.sqlite3``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "index.sqlite3"
        self._local = threading.local()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.ensure_schema(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error)."""
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def ensure_schema(self, script: str) -> None:
        conn = self.connect()
        conn.executescript(script)

    # --- queries -----------------------------------------------------------------

    def latest_instances(self, study_uid: str) -> list[InstanceRecord]:
        """The newest version of every instance of a study."""
        rows = (
            self.connect()
            .execute(
                """SELECT * FROM instances i WHERE study_instance_uid = ? AND version = (
                   SELECT MAX(version) FROM instances j
                   WHERE j.sop_instance_uid = i.sop_instance_uid)
               ORDER BY series_instance_uid, id""",
                (study_uid,),
            )
            .fetchall()
        )
        return [_instance(r) for r in rows]

    def instance_paths(self, study_uid: str) -> list[Path]:
        """Every stored file (all versions) of a study."""
        rows = self.connect().execute(
            "SELECT path FROM instances WHERE study_instance_uid = ?", (study_uid,)
        )
        return [Path(r[0]) for r in rows]

    def instance_versions(self, sop_instance_uid: str) -> list[InstanceRecord]:
        rows = (
            self.connect()
            .execute(
                "SELECT * FROM instances WHERE sop_instance_uid = ? ORDER BY version",
                (sop_instance_uid,),
            )
            .fetchall()
        )
        return [_instance(r) for r in rows]

    def study(self, study_uid: str) -> StudyRecord | None:
        row = (
            self.connect()
            .execute("SELECT * FROM studies WHERE study_instance_uid = ?", (study_uid,))
            .fetchone()
        )
        return None if row is None else _study(row)

    def studies(self, state: str | None = None) -> list[StudyRecord]:
        sql = "SELECT * FROM studies"
        args: tuple[str, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state,)
        return [_study(r) for r in self.connect().execute(sql + " ORDER BY rowid", args)]

    def quiet_studies(self, quiet_period_s: float, now: float | None = None) -> list[str]:
        """Studies still receiving whose last instance is older than the quiet period."""
        cutoff = (time.time() if now is None else now) - quiet_period_s
        rows = (
            self.connect()
            .execute(
                "SELECT study_instance_uid FROM studies WHERE state = 'receiving' "
                "AND last_received_at <= ? ORDER BY last_received_at",
                (cutoff,),
            )
            .fetchall()
        )
        return [r[0] for r in rows]


def _instance(r: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=r["sop_instance_uid"],
        version=r["version"],
        sop_class_uid=r["sop_class_uid"],
        study_instance_uid=r["study_instance_uid"],
        series_instance_uid=r["series_instance_uid"],
        transfer_syntax_uid=r["transfer_syntax_uid"],
        path=Path(r["path"]),
        sha256=r["sha256"],
        size=r["size"],
        calling_ae=r["calling_ae"],
        received_at=r["received_at"],
    )


def _study(r: sqlite3.Row) -> StudyRecord:
    return StudyRecord(
        study_instance_uid=r["study_instance_uid"],
        state=r["state"],
        generation=r["generation"],
        first_received_at=r["first_received_at"],
        last_received_at=r["last_received_at"],
        completed_at=r["completed_at"],
        calling_ae=r["calling_ae"],
        calling_host=r["calling_host"],
        note=r["note"],
    )
