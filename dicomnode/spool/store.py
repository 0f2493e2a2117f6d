"""Durable storage of received instances: the only thing the C-STORE handler calls.

:meth:`Spool.store` appends the bytes exactly as received (file meta + encoded dataset, no
decoding) to the receive log (:mod:`dicomnode.spool.journal`), writes them to
``spool/<study>/<series>/<sop>[.vN].dcm`` (temporary file, rename) and records the instance
in the index while the log is fsynced.  Only when the log sync covers the instance does it
return, and only then does the node answer 0x0000.

Duplicate policy (same SOP Instance UID again): the same data set (whatever its file meta)
is acknowledged and ignored; a different one is kept as a new version (the newest version
is the one processed) and logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import queue
import shutil
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from dicomnode.errors import InvalidInstanceError, OutOfResourcesError, SpoolError
from dicomnode.fsutil import (
    PART_SUFFIX,
    fsync_dir,
    fsync_file,
    remove_partial_files,
    write_bytes_atomically,
    write_direct,
)
from dicomnode.shared import ProcessCounts
from dicomnode.spool.feedback import FeedbackInbox, is_feedback_candidate
from dicomnode.spool.header import dataset_sha256, drives_processing, read_header
from dicomnode.spool.index import Index, InstanceHeader, InstanceRecord, NewInstance
from dicomnode.spool.journal import (
    LOG_DIR,
    BufferPool,
    LogRecord,
    ReceiveLog,
    RecordBuffer,
    Segment,
    owners,
    read_segment,
    segment_files,
)

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
#: Free space held, beyond an instance and its file system blocks, for what is written after
#: its acknowledgement: its index row (SQLite appends about 26 KiB of write-ahead log pages
#: per instance, measured), the audit line.
INDEX_SLACK = 64 * 2**10


class StoreOutcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new_version"


@dataclass(frozen=True)
class Pending:
    """An instance in the receive log, to be spooled (:meth:`Spool.spool_logged`); its
    buffer goes back to ``pool`` once spooled."""

    buffer: RecordBuffer
    pool: BufferPool
    header: InstanceHeader
    calling_ae: str
    calling_host: str
    segment: Segment
    ticket: int
    #: The SHA-256 of the whole file (computed as it arrived).
    sha256: str
    #: Free space held for its spool file and index row until they are written.
    reserved: int = 0


SpoolQueue = queue.Queue[tuple[Pending, Callable[[StoreOutcome], None] | None] | None]


#: Threads writing spool files and index rows behind the receive log.
class ReceivedFile:
    """An instance too large to hold in memory, written to a file of the spool's tmp
    folder as it arrives (``*.part``: removed at start-up if a crash leaves it behind).  A
    write that fails (a full disk) is kept as :attr:`error` and the rest is dropped: the
    store then refuses the instance."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.length = 0
        self.error: OSError | None = None
        self._file: BinaryIO | None = None
        try:
            self._file = open(path, "xb")  # noqa: SIM115 (closed by mapped or discard)
        except OSError as exc:
            self.error = exc

    def write(self, data: bytes | memoryview) -> None:
        if self._file is None or self.error is not None:
            return
        try:
            self._file.write(data)
            self.length += len(data)
        except OSError as exc:
            self.error = exc

    @contextlib.contextmanager
    def mapped(self) -> Iterator[memoryview]:
        """The bytes received, mapped read-only (the file is closed for writing first);
        raises the write error, if one happened, as :class:`OutOfResourcesError` or
        :class:`SpoolError`."""
        if self._file is not None:
            self._file.close()
        if self.error is not None:
            raise _write_error(self.error, "a large instance")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                yield view
            finally:
                view.release()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)


SPOOLER_THREADS = 2


class Spool:
    """Received instances on disk plus their index rows.

    A store appends the instance to the receive log (:mod:`dicomnode.spool.journal`),
    writes the spool file and the index row while the log is being fsynced, and returns
    once the log sync covers it: one durable write per instance, shared by concurrent
    stores.  A checkpoint thread makes the spool files and the index durable every
    ``checkpoint_interval_s`` and retires the log segments behind them; :meth:`recover`
    replays what an unclean stop left in the log.  Call :meth:`close` at shutdown.
    """

    def __init__(
        self,
        data_dir: Path,
        index: Index,
        *,
        min_free_bytes: int,
        rerun_late: bool = True,
        drives: Callable[[InstanceHeader], bool] = drives_processing,
        log_owner: str = "0",
        checkpoint_interval_s: float = 1.0,
        buffer_limit: int = 32,
        held: ProcessCounts | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.root = data_dir / SPOOL_DIR
        self.tmp = data_dir / "tmp"
        self.index = index
        self.min_free_bytes = min_free_bytes
        self.rerun_late = rerun_late
        self.drives = drives
        self.log_owner = log_owner
        self.checkpoint_interval_s = checkpoint_interval_s
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self._log: ReceiveLog | None = None
        self._log_lock = threading.Lock()
        #: Buffers an instance is received into and logged from (bounded: back-pressure).
        self.buffers = BufferPool(buffer_limit)
        self._spoolers: dict[int, threading.Thread] = {}
        self._queues: list[SpoolQueue] = [queue.Queue() for _ in range(SPOOLER_THREADS)]
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._checkpoint_lock = threading.Lock()
        self._free_estimate, self._free_at = 0, 0.0
        #: Bytes held for instances acknowledged (in the log) and not yet spooled, by
        #: every receiving process of the node when it has several.
        self.held = held or ProcessCounts()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`OutOfResourcesError` when ``incoming`` bytes would leave less than
        the watermark free, counting the space held for instances acknowledged and not yet
        spooled (by any receiving process).  Far from the watermark the free space is
        estimated (asked of the file system every 0.2 s), near it asked every time."""
        now = time.monotonic()
        held = self.held.total
        estimate = self._free_estimate - incoming
        if now - self._free_at > 0.2 or estimate - held < self.min_free_bytes + 256 * 2**20:
            self._free_estimate, self._free_at = self.free_bytes(), now
            estimate = self._free_estimate - incoming
        free = estimate + incoming - held
        self._free_estimate = estimate  # the instance's bytes are about to be written
        if free - incoming < self.min_free_bytes:
            self._free_estimate = free
            raise OutOfResourcesError(
                f"data directory has {free // 2**20} MiB free, below the watermark of "
                f"{self.min_free_bytes // 2**20} MiB"
            )

    def store(
        self,
        encoded: bytes,
        *,
        calling_ae: str,
        calling_host: str,
        header: InstanceHeader | None = None,
    ) -> StoreOutcome:
        """Store one instance durably; raise a :class:`SpoolError` subclass on failure.

        The receive log, the spool file and the index, in the calling thread; the fast
        path (:mod:`dicomnode.net.ul`) fills a buffer of :attr:`buffers` as the instance
        arrives and uses :meth:`log_instance`, :meth:`spool_later` and
        :meth:`wait_durable` instead, so that the spool file and the index are written
        while the next instance arrives."""
        header = header or read_header(encoded)
        buffer = self.buffers.take()
        try:
            buffer.extend(encoded)
            pending = self.log_instance(
                buffer,
                calling_ae=calling_ae,
                calling_host=calling_host,
                header=header,
                sha256=hashlib.sha256(encoded).hexdigest(),
            )
        except BaseException:
            self.buffers.give(buffer)
            raise
        try:
            outcome = self.spool_logged(pending)
        except BaseException:
            self._release(pending.reserved)
            self.receive_log().applied(pending.segment, None)  # refused: not stored
            self.buffers.give(buffer)
            raise
        self.wait_durable(pending)
        return outcome

    def log_instance(
        self,
        buffer: RecordBuffer,
        *,
        calling_ae: str,
        calling_host: str,
        header: InstanceHeader,
        sha256: str,
    ) -> Pending:
        """Write a checked instance (in a buffer of :attr:`buffers`) to the receive log
        (durable after :meth:`wait_durable`); raises :class:`OutOfResourcesError` below
        the watermark (room for the spool file) or when the disk is full."""
        # Room for the spool file and the index row written after the answer, with slack
        # for file system blocks, the WAL and the audit line, held until they are written:
        # a full disk then refuses the instance here rather than failing behind an
        # acknowledgement.  (The space was checked but not held until 2026-12-02: two
        # instances acknowledged back to back with room for one both passed the check,
        # and the second could not be indexed.)
        need = buffer.length + buffer.length // 8 + INDEX_SLACK
        with self.held.lock:  # one step across the node's receiving processes
            self.check_space(need)
            self.held.add(need)
        self._ensure_checkpointer()
        try:
            segment, ticket = self.receive_log().append(
                buffer, calling_ae=calling_ae, calling_host=calling_host, sha256=sha256
            )
        except BaseException as exc:
            self._release(need)
            if isinstance(exc, OSError):
                raise _write_error(exc, "the receive log") from exc
            raise
        return Pending(
            buffer, self.buffers, header, calling_ae, calling_host, segment, ticket, sha256, need
        )

    def _release(self, reserved: int) -> None:
        self.held.change(-reserved)

    def wait_durable(self, pending: Pending) -> None:
        """Block until the log sync covers the instance: then it may be acknowledged."""
        _sync_or_raise(lambda: self.receive_log().wait_durable(pending.ticket))

    def spool_logged(self, pending: Pending) -> StoreOutcome:
        """Write a logged instance's spool file and index row (no sync: the log holds it
        until the next checkpoint), or recognise it as a duplicate; the buffer goes back
        to its pool once this succeeded.

        Stores of one SOP Instance UID are serialised (a sender may retry on a second
        association while the first is still being stored): both would pick the same
        version and file name, and the loser must not remove the winner's file."""
        header, body = pending.header, pending.buffer.body
        outcome, spooled = self._store_one(
            body,
            header,
            pending.sha256,
            pending.calling_ae,
            pending.calling_host,
            padded=pending.buffer.padded,
        )
        self._release(pending.reserved)
        self.receive_log().applied(pending.segment, spooled)
        del body
        pending.pool.give(pending.buffer)
        return outcome

    def _store_one(
        self,
        body: bytes | memoryview,
        header: InstanceHeader,
        whole: str,
        calling_ae: str,
        calling_host: str,
        *,
        durable: bool = False,
        padded: memoryview | None = None,
    ) -> tuple[StoreOutcome, Path | None]:
        """The spool file and index row of a new instance or version, or nothing for a
        duplicate; returns the outcome and the file written.  ``padded``: ``body`` in
        page-aligned memory up to a block boundary, written past the page cache
        (:func:`~dicomnode.fsutil.write_direct`)."""
        uid = header.sop_instance_uid
        with self._uid_locks[zlib.crc32(uid.encode()) % len(self._uid_locks)]:
            versions = self.index.instance_versions(uid)
            # The data set's own digest only when there is something to compare it with:
            # a new SOP Instance UID (nearly every instance) costs one SHA-256, not two.
            content = dataset_sha256(body) if versions else None
            if content is not None and any(_content_of(v) == content for v in versions):
                log.info("duplicate instance %s ignored (identical data set)", uid)
                try:
                    self.index.touch_study(header.study_instance_uid)
                except sqlite3.Error as exc:  # stored already: still acknowledged
                    log.warning("duplicate %s: study not touched: %s", uid, exc)
                return StoreOutcome.DUPLICATE, None
            return self._spool(
                body,
                calling_ae,
                calling_host,
                header,
                content,
                versions,
                durable=durable,
                whole=whole,
                padded=padded,
            )

    # --- instances too large to hold in memory ------------------------------------------

    def receive_into_file(self) -> ReceivedFile:
        """A file in the tmp folder to receive a large instance into, as it arrives."""
        return ReceivedFile(self.tmp / f".{uuid.uuid4().hex}{PART_SUFFIX}")

    def store_received_file(
        self,
        received: ReceivedFile,
        *,
        calling_ae: str,
        calling_host: str,
        header: InstanceHeader,
        sha256: str,
    ) -> StoreOutcome:
        """Store a large instance received into a file durably before returning (spool
        file fsynced and renamed into place, folder fsynced, index row committed with
        ``synchronous=FULL``: one instance of this size costs a few syncs, not a copy in
        the receive log); the received file is removed whatever happens.  Raises as
        :meth:`store` does."""
        try:
            self.check_space(received.length + received.length // 8 + INDEX_SLACK)
            with received.mapped() as body:
                outcome, _ = self._store_one(
                    body, header, sha256, calling_ae, calling_host, durable=True
                )
            return outcome
        finally:
            received.discard()

    def spool_later(
        self, pending: Pending, done: Callable[[StoreOutcome], None] | None = None
    ) -> None:
        """:meth:`spool_logged` in a spooler thread; ``done`` is told the outcome.  Each SOP
        Instance UID has its thread (its versions are numbered in arrival order); the
        threads hash, write and index at once (the GIL is released meanwhile).  A failure
        is logged and retried with back-off (the instance is in the log, acknowledged or
        about to be: it is never dropped)."""
        uid = pending.header.sop_instance_uid
        number = zlib.crc32(uid.encode()) % SPOOLER_THREADS
        with self._log_lock:
            thread = self._spoolers.get(number)
            if thread is None or not thread.is_alive():
                thread = threading.Thread(
                    target=self._spool_loop, args=(self._queues[number],), name="spooler"
                )
                thread.daemon = True
                thread.start()
                self._spoolers[number] = thread
        self._queues[number].put((pending, done))

    def spooled_all(self, timeout: float) -> bool:
        """Wait until every instance handed to :meth:`spool_later` is spooled."""
        deadline = time.monotonic() + timeout
        for waiting in self._queues:
            with waiting.all_tasks_done:
                while waiting.unfinished_tasks:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    waiting.all_tasks_done.wait(left)
        return True

    def _spool_loop(self, waiting: SpoolQueue) -> None:
        """Until the queue has been idle for a minute (or the spool is closed): the next
        :meth:`spool_later` starts a new thread, so an idle or abandoned spool holds no
        thread and no database connection."""
        while True:
            try:
                item = waiting.get(timeout=60.0)
            except queue.Empty:
                with self._log_lock:
                    if waiting.empty():
                        self._spoolers = {
                            k: t
                            for k, t in self._spoolers.items()
                            if t is not threading.current_thread()
                        }
                        return
                continue
            if item is None:
                waiting.task_done()
                return
            pending, done = item
            delay = 0.1
            while True:
                try:
                    outcome = self.spool_logged(pending)
                    break
                except Exception as exc:
                    log.error(
                        "instance %s is in the receive log but could not be spooled "
                        "(retried in %.1f s): %s",
                        pending.header.sop_instance_uid,
                        delay,
                        exc,
                    )
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
            try:
                if done is not None:
                    done(outcome)
            except Exception:
                log.exception("spooled-instance callback failed")
            finally:
                waiting.task_done()

    def _spool(
        self,
        encoded: bytes | memoryview,
        calling_ae: str,
        calling_host: str,
        header: InstanceHeader,
        content: str | None,
        versions: list[InstanceRecord],
        *,
        durable: bool = False,
        whole: str | None = None,
        padded: memoryview | None = None,
    ) -> tuple[StoreOutcome, Path]:
        """Write the spool file and the index row of a new version (no sync unless
        ``durable``: the receive log holds the bytes; past the page cache from ``padded``
        when given and not ``durable``)."""
        version = (versions[-1].version + 1) if versions else 1
        relative = "/".join(
            (
                SPOOL_DIR,
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_instance_uid + (f".v{version}" if version > 1 else "") + ".dcm",
            )
        )
        final = self.data_dir / relative
        try:
            if padded is not None and not durable:
                write_direct(final, padded, len(encoded), self.tmp)
            else:
                write_bytes_atomically(final, encoded, self.tmp, durable=durable)
        except OSError as exc:
            raise _write_error(exc, final.name) from exc
        new = NewInstance(
            header=header,
            version=version,
            path=relative,
            content_sha256=content,
            drives=self.drives(header),
            sha256=whole or hashlib.sha256(encoded).hexdigest(),
            size=len(encoded),
            calling_ae=calling_ae,
            calling_host=calling_host,
        )
        try:
            self.index.add_instance(new, rerun_late=self.rerun_late, durable=durable)
        except sqlite3.IntegrityError:
            # Another process indexed this version meanwhile: keep its file, store ours anew.
            versions = self.index.instance_versions(header.sop_instance_uid)
            content = content or dataset_sha256(encoded)
            if any(_content_of(v) == content for v in versions):
                return StoreOutcome.DUPLICATE, final
            if all(v.path != final for v in versions):
                final.unlink(missing_ok=True)
            return self._spool(
                encoded,
                calling_ae,
                calling_host,
                header,
                content,
                versions,
                durable=durable,
                whole=whole,
                padded=padded,
            )
        except sqlite3.Error as exc:
            final.unlink(missing_ok=True)
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise OutOfResourcesError(f"disk full while indexing {final.name}") from exc
            raise SpoolError(f"cannot index {header.sop_instance_uid}: {exc}") from exc
        if version > 1:
            log.warning(
                "instance %s received again with different content: kept as version %d",
                header.sop_instance_uid,
                version,
            )
            return StoreOutcome.NEW_VERSION, final
        return StoreOutcome.STORED, final

    # --- the receive log --------------------------------------------------------------

    def receive_log(self) -> ReceiveLog:
        """This process's receive log, opened (with its checkpoint thread) on first use;
        raises :class:`OutOfResourcesError` when its first segment does not fit."""
        with self._log_lock:
            if self._log is None:
                try:
                    self._log = ReceiveLog(self.data_dir, self.log_owner)
                except OSError as exc:
                    raise _write_error(exc, "the receive log") from exc
                self._stopping.clear()
            return self._log

    def _ensure_checkpointer(self) -> None:
        receive_log = self.receive_log()
        with self._log_lock:
            if self._checkpointer is None and self._log is receive_log:
                self._checkpointer = threading.Thread(
                    target=self._checkpoint_loop, name="spool-checkpoint", daemon=True
                )
                self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Checkpoints every ``checkpoint_interval_s``; a spare log segment as soon as one
        was taken.  Ends after a minute with nothing to do (an idle or abandoned spool
        keeps no thread waking up); the next store starts it again."""
        receive_log = self._log
        next_at = time.monotonic() + self.checkpoint_interval_s
        idle_since = time.monotonic()
        appended = -1
        while not self._stopping.is_set():
            left = max(0.0, next_at - time.monotonic())
            if receive_log is not None and receive_log.spare_wanted.wait(left):
                if self._stopping.is_set():  # woken by close(): no spare to prepare
                    break
                try:
                    receive_log.prepare_spare()
                except OSError as exc:  # a full disk: stores refuse; tried at the next one
                    log.warning("receive log: no spare segment prepared: %s", exc)
            if time.monotonic() < next_at:
                continue
            next_at = time.monotonic() + self.checkpoint_interval_s
            try:
                self.checkpoint()
            except Exception as exc:  # retried at the next interval; the log still holds all
                log.error("spool checkpoint failed (retried): %s", exc)
            now_appended = receive_log.appended if receive_log is not None else 0
            if now_appended != appended:
                appended, idle_since = now_appended, time.monotonic()
            elif time.monotonic() - idle_since > 60.0:
                with self._log_lock:
                    if receive_log is None or receive_log.appended == appended:
                        self._checkpointer = None
                        return

    def checkpoint(self) -> int:
        """Make the spool files written since the last checkpoint and the index durable,
        then reuse the full log segments behind them; returns the files made durable."""
        with self._checkpoint_lock:
            receive_log = self._log
            if receive_log is None:
                return 0
            files, done = receive_log.checkpoint_begin()
            self._make_durable(files, len(files) > 0 or len(done) > 0)
            receive_log.retire(done)
            return len(files)

    def _make_durable(self, files: list[Path], commit: bool) -> None:
        for path in files:
            try:
                fsync_file(path)
            except FileNotFoundError:  # purged since (retention)
                continue
        for folder in {p.parent for p in files}:
            if folder.is_dir():
                fsync_dir(folder)
        if commit:
            self.index.checkpoint(self.log_owner, len(files))

    def close(self) -> None:
        """Spool what is queued, a last checkpoint: the log is left empty after a clean
        stop."""
        if not self.spooled_all(60.0):
            log.error("instances still queued for the spool at shutdown stay in the log")
        with self._log_lock:
            spoolers, self._spoolers = dict(self._spoolers), {}
        for number, thread in spoolers.items():
            self._queues[number].put(None)  # the thread ends (and its database connection)
            thread.join(10)
        self._stopping.set()
        if self._checkpointer is not None:
            with self._log_lock:
                current = self._log
            if current is not None:
                current.spare_wanted.set()  # wakes the checkpointer now, not at its interval
            self._checkpointer.join(30)
            self._checkpointer = None
        with self._checkpoint_lock, self._log_lock:
            receive_log, self._log = self._log, None
            if receive_log is None:
                return
            files, _ = receive_log.checkpoint_begin()
            left = receive_log.close()
            try:
                self._make_durable(files, bool(files) or any(s.size for s in left))
            except (OSError, sqlite3.Error) as exc:  # replayed at the next start
                log.error("last checkpoint failed, the receive log stays: %s", exc)
                return
            if all(s.in_flight == 0 for s in left):
                receive_log.retire(left)

    def recover(self, owner: str | None = None) -> int:
        """Replay the log segments an unclean stop left (of ``owner``, or all); returns the
        instances that were not in the spool and index and now are.

        Each whole record is checked against the index: an instance already indexed with
        the same data set whose file is intact is skipped; a missing or torn file is
        rewritten; an unknown one is stored.  Instances indexed after the oldest segment
        began whose file is torn and that no whole record holds were never acknowledged
        (a power cut before the log sync): their rows are removed.  A Segmentation the
        node did not make is noted in the feedback inbox again (once: the note is
        idempotent), since a crash may have come between its index row and its note."""
        paths = segment_files(self.data_dir, owner)
        if not paths:
            self.held.reset()  # nothing of a predecessor's left unspooled
            return 0
        restored = 0
        logged: set[str] = set()
        since = self.index.last_checkpoint(owners(paths))
        for path in paths:
            for record in read_segment(path):
                whole = record.sha256  # checked when read
                try:
                    header = read_header(record.body)
                    restored += self._replay(record, header, whole)
                    if is_feedback_candidate(header):  # its note may have been lost too
                        FeedbackInbox(self.index.db).note(
                            header, calling_ae=record.calling_ae, calling_host=record.calling_host
                        )
                except Exception as exc:  # the segment stays; the node does not start
                    raise SpoolError(
                        f"receive log {path}: an acknowledged instance cannot be restored: {exc}"
                    ) from exc
                logged.add(whole)
        for row in self.index.instances_received_since(since):
            if row.sha256 in logged or _intact(row.path, row.sha256):
                continue
            log.warning(
                "instance %s: file torn by a crash and never acknowledged: row removed",
                row.sop_instance_uid,
            )
            self.index.remove_instance(row.sop_instance_uid, row.version)
        for name in owners(paths):
            self.index.checkpoint(name, restored)
        for path in paths:
            path.unlink()
        fsync_dir(self.data_dir / LOG_DIR)
        self.held.reset()  # what a predecessor of this process held is spooled now
        if restored:
            log.warning("receive log: %d acknowledged instance(s) restored", restored)
        return restored

    def _replay(self, record: LogRecord, header: InstanceHeader, whole: str) -> int:
        """One logged instance back into the spool: its file rewritten if torn, stored if
        missing; nothing when it was a duplicate of a version held."""
        versions = self.index.instance_versions(header.sop_instance_uid)
        same = [v for v in versions if v.sha256 == whole]
        if same:
            if not _intact(same[-1].path, whole):
                write_bytes_atomically(same[-1].path, record.body, self.tmp)
                return 1
            return 0
        content = dataset_sha256(record.body)
        if any(_content_of(v) == content for v in versions):
            return 0  # acknowledged as a duplicate of a version held
        self._spool(
            record.body,
            record.calling_ae,
            record.calling_host,
            header,
            content,
            versions,
            durable=True,
            whole=whole,
        )
        return 1

    # --- housekeeping -----------------------------------------------------------------

    def purge_study(self, study_uid: str) -> int:
        """Delete a study's spooled files and index rows (retention); returns files removed."""
        removed = 0
        for path in self.index.instance_paths(study_uid):
            if path.exists():
                path.unlink()
                removed += 1
        shutil.rmtree(self.root / study_uid, ignore_errors=True)
        self.index.remove_study(study_uid)
        return removed

    def cleanup_tmp(self) -> int:
        """Remove partial files left by a crash (they were never acknowledged)."""
        return remove_partial_files(self.tmp)


def _intact(path: Path, sha256: str) -> bool:
    """The file holds the bytes indexed (the SHA-256 of the whole file)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def _content_of(version: InstanceRecord) -> str | None:
    """A stored version's data set digest: indexed, or (rows stored without it) read from
    its file; None when the file cannot be read."""
    if version.content_sha256:
        return version.content_sha256
    try:
        return dataset_sha256(version.path.read_bytes())
    except (OSError, InvalidInstanceError, ValueError):
        return None


def _write_error(exc: OSError, what: str) -> SpoolError:
    if exc.errno in (28, 122):  # ENOSPC, EDQUOT
        return OutOfResourcesError(f"disk full while writing {what}")
    return SpoolError(f"cannot write {what}: {exc}")


def _sync_or_raise(wait: Callable[[], None]) -> None:
    try:
        wait()
    except OSError as exc:
        raise _write_error(exc, "the receive log (sync)") from exc
