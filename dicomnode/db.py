"""The node's SQLite database: connections, transactions and the versioned schema.

One file, ``data_dir/index.sqlite3``, in WAL mode with ``synchronous=FULL``: a committed
row survives a crash or power loss.  The receive path alone commits with
``synchronous=NORMAL``; what it records is in the fsynced receive log until the next
checkpoint (:mod:`dicomnode.spool.journal`).  Each thread or
process opens its own connection (:meth:`Database.connect`).

This module runs no query of its own on the node's data.  Each table has one owner that
runs all SQL on it: ``spool.index`` (instances, studies), ``spool.feedback`` (feedback),
``jobs.store`` (jobs) and ``delivery.store`` (outbox).  Owners take part in one
transaction by receiving the connection :meth:`Database.transaction` yields.

The schema carries its version in ``PRAGMA user_version``.  :data:`MIGRATIONS` upgrades
a data directory in place, one step per version, each step in its own transaction; a
new database runs the same steps from version 0.  Version 0 is a data directory made
before the schema was versioned (tables without ``user_version``).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomnode.errors import SpoolError
from dicomnode.uids import is_image_storage, is_own_uid

DB_FILE = "index.sqlite3"

_V1_TABLES = """
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


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}


def _v1_tables(conn: sqlite3.Connection, data_dir: Path) -> None:
    """The tables of the first release (some of its data directories lack worker_pid)."""
    for statement in _V1_TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    if "worker_pid" not in _columns(conn, "jobs"):
        conn.execute("ALTER TABLE jobs ADD COLUMN worker_pid INTEGER")


def relative_to_data_dir(path: str, data_dir: Path, marker: str) -> str:
    """A stored path made relative to the data directory.

    Paths under ``data_dir`` lose that prefix; paths written by a data directory that has
    since moved keep what follows their last ``/<marker>/`` component (``spool``,
    ``results``).  Anything else stays as it is.
    """
    root = str(data_dir.resolve()).rstrip("/") + "/"
    if path.startswith(root):
        return path[len(root) :]
    cut = path.rfind(f"/{marker}/")
    return path[cut + 1 :] if cut >= 0 else path


def _route_in_result_name(stored: str, route: str, data_dir: Path) -> str:
    """``results/job-1/<series>-seg.dcm`` -> ``results/job-1/<series>-<route>-seg.dcm``.

    The file gets a hard link under its new name (the old name stays until retention
    removes the job's folder), so a crash before the commit loses nothing."""
    path = Path(stored)
    for suffix in ("-seg.dcm", "-sr.dcm"):
        if path.name.endswith(suffix) and not path.name.endswith(f"-{route}{suffix}"):
            new = path.with_name(path.name.removesuffix(suffix) + f"-{route}{suffix}")
            old_file, new_file = data_dir / path, data_dir / new
            if old_file.is_file() and not new_file.exists():
                os.link(old_file, new_file)
            return str(new)
    return stored


def _v2_relative_paths_and_study_retries(conn: sqlite3.Connection, data_dir: Path) -> None:
    """Paths relative to the data directory (it may be moved or mounted elsewhere); result
    files named by series and route (two routes on one series no longer share names);
    studies whose routing failed (an unreadable header) retried with back-off."""
    rows = conn.execute("SELECT id, path FROM instances").fetchall()
    conn.executemany(
        "UPDATE instances SET path = ? WHERE id = ?",
        [(relative_to_data_dir(r[1], data_dir, "spool"), r[0]) for r in rows],
    )
    rows = conn.execute(
        "SELECT o.id, o.path, j.route FROM outbox o JOIN jobs j ON j.id = o.job_id"
    ).fetchall()
    conn.executemany(
        "UPDATE outbox SET path = ? WHERE id = ?",
        [
            (
                _route_in_result_name(
                    relative_to_data_dir(r[1], data_dir, "results"), r[2], data_dir
                ),
                r[0],
            )
            for r in rows
        ],
    )
    columns = _columns(conn, "studies")
    for name, ddl in (
        ("attempts", "INTEGER NOT NULL DEFAULT 0"),
        ("next_attempt_at", "REAL NOT NULL DEFAULT 0"),
        ("last_error", "TEXT NOT NULL DEFAULT ''"),
    ):
        if name not in columns:
            conn.execute(f"ALTER TABLE studies ADD COLUMN {name} {ddl}")


def _v3_what_drives_processing(conn: sqlite3.Connection, data_dir: Path) -> None:
    """Instances record whether they drive processing (images that are not the node's own
    results) and a digest of their dataset without the file meta (a PACS re-sending an
    instance is a duplicate even when the meta differs); jobs record a digest of their
    inputs (a re-opened study with no new images in a routed series makes no new job)."""
    columns = _columns(conn, "instances")
    if "drives" not in columns:
        conn.execute("ALTER TABLE instances ADD COLUMN drives INTEGER NOT NULL DEFAULT 1")
        rows = conn.execute("SELECT id, sop_class_uid, sop_instance_uid FROM instances")
        conn.executemany(
            "UPDATE instances SET drives = ? WHERE id = ?",
            [(int(is_image_storage(r[1]) and not is_own_uid(r[2])), r[0]) for r in rows.fetchall()],
        )
    if "content_sha256" not in columns:
        conn.execute("ALTER TABLE instances ADD COLUMN content_sha256 TEXT")
    if "inputs_digest" not in _columns(conn, "jobs"):
        conn.execute("ALTER TABLE jobs ADD COLUMN inputs_digest TEXT NOT NULL DEFAULT ''")


def _v4_job_priorities(conn: sqlite3.Connection, data_dir: Path) -> None:
    """Jobs record the study's request priority (claim order: STAT first, then age) and
    the triage priority their results were given (urgent, review, routine)."""
    columns = _columns(conn, "jobs")
    if "request_priority" not in columns:
        conn.execute("ALTER TABLE jobs ADD COLUMN request_priority INTEGER NOT NULL DEFAULT 0")
    if "triage_priority" not in columns:
        conn.execute("ALTER TABLE jobs ADD COLUMN triage_priority TEXT NOT NULL DEFAULT ''")


def _v5_query_attributes(conn: sqlite3.Connection, data_dir: Path) -> None:
    """The attributes C-FIND matches on (``spool.query``), one row per object the node can
    be asked for: received instances (newest version) and its own result files.  Filled
    lazily before each query, so instances received before this version are found too."""
    conn.execute(
        """CREATE TABLE IF NOT EXISTS query_instances (
            sop_instance_uid TEXT NOT NULL,
            origin TEXT NOT NULL CHECK (origin IN ('received', 'result')),
            study_instance_uid TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL,
            transfer_syntax_uid TEXT NOT NULL,
            path TEXT NOT NULL,
            job_id INTEGER,
            source_id INTEGER NOT NULL,
            attributes TEXT NOT NULL,
            UNIQUE (sop_instance_uid, origin)
        )"""
    )
    conn.execute(
        "CREATE INDEX IF NOT EXISTS query_instances_study ON query_instances (study_instance_uid)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS query_instances_source ON query_instances (source_id)")


def _v6_first_delivery(conn: sqlite3.Connection, data_dir: Path) -> None:
    """Outbox items keep when they were first delivered and the status the destination
    gave, across a forced re-run that sends them again (the record of what was sent)."""
    columns = _columns(conn, "outbox")
    if "delivered_at" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN delivered_at REAL")
        conn.execute("ALTER TABLE outbox ADD COLUMN delivered_status INTEGER")
        conn.execute(
            "UPDATE outbox SET delivered_at = updated_at, delivered_status = status "
            "WHERE state = 'done'"
        )


def _v7_receive_log(conn: sqlite3.Connection, data_dir: Path) -> None:
    """The receive log's checkpoints (a durable commit there syncs the WAL, which makes
    the receive path's ``synchronous=NORMAL`` commits durable), and instances by arrival
    time (recovery checks those indexed since the oldest log segment left)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS receive_checkpoints ("
        "owner TEXT PRIMARY KEY, checkpointed_at REAL NOT NULL, instances INTEGER NOT NULL)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS instances_received ON instances (received_at)")


def _v8_feedback(conn: sqlite3.Connection, data_dir: Path) -> None:
    """Segmentations sent back to the node by others (a radiologist's correction): one row
    per SOP instance, recorded as it arrives and settled later as training data with its
    provenance, or not (``spool.feedback``)."""
    conn.execute(
        """CREATE TABLE IF NOT EXISTS feedback (
            id INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL UNIQUE,
            sop_class_uid TEXT NOT NULL,
            study_instance_uid TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL,
            calling_ae TEXT NOT NULL,
            calling_host TEXT NOT NULL,
            received_at REAL NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('received', 'accepted', 'rejected')),
            settled_at REAL,
            reason TEXT NOT NULL DEFAULT '',
            path TEXT NOT NULL DEFAULT '',
            provenance TEXT NOT NULL DEFAULT '{}'
        )"""
    )
    conn.execute("CREATE INDEX IF NOT EXISTS feedback_state ON feedback (state, received_at)")


#: Step ``i`` upgrades a database from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[Callable[[sqlite3.Connection, Path], None], ...] = (
    _v1_tables,
    _v2_relative_paths_and_study_retries,
    _v3_what_drives_processing,
    _v4_job_priorities,
    _v5_query_attributes,
    _v6_first_delivery,
    _v7_receive_log,
    _v8_feedback,
)
SCHEMA_VERSION = len(MIGRATIONS)


class Database:
    """Connections to ``data_dir/index.sqlite3``; opening one upgrades the schema."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / DB_FILE
        self._local = threading.local()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.migrate()

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
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error).

        ``durable=False`` commits with ``synchronous=NORMAL``: the commit survives a crash
        of the process but not a power cut until the next durable commit of any
        connection syncs the WAL.  Only the receive path uses it, where the receive log
        (:mod:`dicomnode.spool.journal`) holds what the commit records until then."""
        conn = self.connect()
        if not durable:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous=FULL")

    @property
    def version(self) -> int:
        return int(self.connect().execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> int:
        """Upgrade the schema to :data:`SCHEMA_VERSION`; returns the version found.

        Every step runs under ``BEGIN IMMEDIATE`` and re-reads the version, so processes
        opening the same data directory at once upgrade it exactly once.
        """
        found = self.version
        if found > SCHEMA_VERSION:
            raise SpoolError(
                f"{self.path} has schema version {found}, newer than this release "
                f"({SCHEMA_VERSION}): upgrade dicomnode or use another data_dir"
            )
        while True:
            with self.transaction() as conn:
                current = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if current >= SCHEMA_VERSION:
                    return found
                MIGRATIONS[current](conn, self.data_dir)
                conn.execute(f"PRAGMA user_version = {current + 1}")

    def resolve(self, stored: str) -> Path:
        """An absolute path for a path stored relative to the data directory."""
        return self.data_dir / stored

    def relative(self, path: Path) -> str:
        """The form of ``path`` to store: relative when it lies in the data directory."""
        try:
            return str(path.resolve().relative_to(self.data_dir.resolve()))
        except ValueError:
            return str(path)
