"""The receive log: one durable write per received instance, shared by concurrent stores.

An instance is acknowledged once its bytes are in this log and the log is fsynced
(``fdatasync``).  The spool file and the index row are written after the append, without
a sync of their own; a checkpoint (every second or so) fsyncs the spool files written
since the previous one and commits the index with ``synchronous=FULL``, and only then are
the full log segments behind them reused.  After an unclean stop,
:meth:`Spool.recover <dicomnode.spool.store.Spool.recover>` replays whatever segments
remain, so an acknowledged instance is never lost, even to a power cut between
checkpoints.

Why a sync costs little here: segments are files of fixed size, written with zeros once
and then reused, so appending a record overwrites blocks that already exist and
``fdatasync`` writes those blocks and nothing else (no file size or block allocation to
commit to the file system's journal, which would also flush every other file written
since, the spool files among them).

Concurrent stores share the sync (group commit): one ``fdatasync`` covers every record
appended before it started (:meth:`ReceiveLog.wait_durable`).

Record layout (little endian)::

    b"DNRL" | u32 segment number | u32 header length | u64 body length
    | header (JSON) | body | b"DNRE"

The header names the caller, the time and the SHA-256 of the body.  A segment file is
named after its number, and a reused file still holds records of its earlier life: those
carry an older number, so reading stops there, as it stops at zeros, at a torn record
(its SHA-256 does not match) or at a record of another number.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.fsutil import fsync_dir

log = logging.getLogger(__name__)

LOG_DIR = "receive-log"
#: Size of a segment file; a record larger than that gets a segment of its own.
SEGMENT_BYTES = 64 * 2**20
FIRST_SEGMENT_BYTES = 4 * 2**20
#: Free segment files kept ready (zero-filled, or retired and reused): 256 MiB of disk,
#: so that a burst of a few hundred MiB never waits for a segment to be written.
POOL_SIZE = 4
#: A spare is zero-filled only when fewer than this many free segments are left: the
#: retired ones refill the pool, and a burst does not write 64 MiB of zeros (and delete a
#: retired segment later) for every 64 MiB it receives (docs/performance.md).
SPARE_LOW = 2
_MAGIC, _END = b"DNRL", b"DNRE"
_HEAD = struct.Struct("<4sIIQ")
_FREE_PREFIX = "free-"
#: Records start on this boundary: written with ``O_DIRECT`` from page-aligned memory.
BLOCK = 4096


def _align(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


class RecordBuffer:
    """Page-aligned, reusable memory for one instance as it arrives: a header block, then
    the body (file meta + data set), then room for the record's end.  Written to the log
    without a copy (``O_DIRECT``), handed to the spooler, then back to its pool; reused
    memory costs no page faults, where a fresh 512 KiB ``bytes`` costs 128 of them."""

    def __init__(self, capacity: int = 2**20) -> None:
        self._memory = mmap.mmap(-1, BLOCK + _align(capacity) + BLOCK)
        self.length = 0

    @property
    def capacity(self) -> int:
        return len(self._memory) - 2 * BLOCK

    def reset(self) -> None:
        self.length = 0

    def extend(self, data: bytes | bytearray | memoryview) -> None:
        end = self.length + len(data)
        if end > self.capacity:
            grown = mmap.mmap(-1, BLOCK + _align(max(end, 2 * self.capacity)) + BLOCK)
            grown[: BLOCK + self.length] = self._memory[: BLOCK + self.length]
            with contextlib.suppress(BufferError):  # a view still alive keeps the old one
                self._memory.close()
            self._memory = grown
        self._memory[BLOCK + self.length : BLOCK + end] = data
        self.length = end

    @property
    def body(self) -> memoryview:
        """The bytes received so far (valid until the next :meth:`extend` or reuse)."""
        return memoryview(self._memory)[BLOCK : BLOCK + self.length]

    @property
    def padded(self) -> memoryview:
        """The body and what follows it to the next block boundary (page-aligned: for a
        write that bypasses the page cache, cut to :attr:`length` afterwards)."""
        return memoryview(self._memory)[BLOCK : BLOCK + _align(self.length)]

    def record(self, header: bytes, number: int) -> memoryview:
        """The whole record, header block and end included, ready to write."""
        if _HEAD.size + len(header) > BLOCK:
            raise ValueError("a receive log record header over one block")
        memory = self._memory
        head = _HEAD.pack(_MAGIC, number, len(header), self.length) + header
        memory[: len(head)] = head
        memory[len(head) : BLOCK] = bytes(BLOCK - len(head))
        end = BLOCK + self.length
        total = _align(end + len(_END))
        memory[end : end + len(_END)] = _END
        memory[end + len(_END) : total] = bytes(total - end - len(_END))
        return memoryview(memory)[:total]

    def shrink(self, limit: int) -> None:
        """Give back memory a very large instance needed (kept in a pool afterwards)."""
        if self.capacity > limit:
            with contextlib.suppress(BufferError):  # a view still alive keeps it
                self._memory.close()
            self._memory = mmap.mmap(-1, BLOCK + _align(2**20) + BLOCK)
        self.length = 0


class BufferPool:
    """Record buffers for reuse; :meth:`take` blocks while ``limit`` are in use (the
    spooler is behind: back-pressure on the senders, memory stays bounded)."""

    def __init__(self, limit: int, keep_bytes: int = 64 * 2**20) -> None:
        self.limit = limit
        self.keep_bytes = keep_bytes
        self._free: list[RecordBuffer] = []
        self._in_use = 0
        self._cond = threading.Condition()

    def take(self) -> RecordBuffer:
        with self._cond:
            self._cond.wait_for(lambda: self._in_use < self.limit)
            self._in_use += 1
            return self._free.pop() if self._free else RecordBuffer()

    def give(self, buffer: RecordBuffer) -> None:
        buffer.shrink(self.keep_bytes)
        with self._cond:
            self._in_use -= 1
            self._free.append(buffer)
            self._cond.notify()


@dataclass(frozen=True)
class LogRecord:
    """One received instance as logged: the caller, the time, the SHA-256 of the bytes
    (the spool file's, also its index row's) and the bytes (file meta + data set) exactly
    as they will be spooled."""

    calling_ae: str
    calling_host: str
    received_at: float
    sha256: str
    body: bytes


@dataclass
class Segment:
    """One log file: appended to until full, then reused after a checkpoint."""

    path: Path
    fd: int
    number: int
    capacity: int
    size: int = 0
    #: Spool files written for this segment's records since the last checkpoint.
    written: list[Path] = field(default_factory=list)
    #: Stores that appended here and have not yet written their spool file and index row.
    in_flight: int = 0
    full: bool = False
    #: Written with ``O_DIRECT`` (from page-aligned memory, no page cache copy).
    direct: bool = False
    #: The sync ticket of the last write: reusable once that sync is done.
    ticket: int = 0


class ReceiveLog:
    """Segments in ``data_dir/receive-log`` named ``<owner>-<number>.log`` (free ones
    ``free-...``).  ``owner`` tells concurrent receiving processes apart; each appends to
    its own segments only.  Thread-safe."""

    def __init__(
        self, data_dir: Path, owner: str = "0", segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.folder = data_dir / LOG_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.owner = owner
        # On a small file system the log takes at most a sixteenth of it per segment.
        free = shutil.disk_usage(self.folder).free
        self.segment_bytes = min(segment_bytes, max(256 * BLOCK, _align(free // 16)))
        #: Free segments kept ready: one on a small file system.
        self.pool_size = POOL_SIZE if self.segment_bytes >= SEGMENT_BYTES else 1
        #: Segments start small (an idle node writes 4 MiB of zeros, not 64) and double
        #: with each new one up to ``segment_bytes``.
        self.next_size = min(self.segment_bytes, FIRST_SEGMENT_BYTES)
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._segments: list[Segment] = []
        self._number = _next_number(self.folder)
        self._closed = False
        self._sync_error: OSError | None = None
        self._syncing = False
        #: Records appended so far (the checkpoint thread ends when it stops growing).
        self.appended = 0
        self._syncs_started = 0
        self._syncs_done = 0
        self._dirty: set[int] = set()
        #: Set when the spare was taken: the checkpoint thread prepares the next at once.
        self.spare_wanted = threading.Event()
        self._current = self._open_segment(self.segment_bytes)

    # --- segment files --------------------------------------------------------------

    def _open_segment(self, least: int) -> Segment:
        """A free file of at least ``least`` bytes under the next number, or a new one
        zero-filled at the next size."""
        self._number += 1
        path = self.folder / f"{self.owner}-{self._number:010d}.log"
        free = self._free_file(least)
        if free is not None:
            os.replace(free, path)
            capacity = path.stat().st_size
        else:
            capacity = _align(max(least, self.next_size))
            _zero_fill(path, capacity)
        fsync_dir(self.folder)
        self.next_size = min(self.segment_bytes, max(self.next_size, capacity) * 2)
        fd, direct = _open_direct(path)
        segment = Segment(path, fd, self._number, capacity, direct=direct)
        self._segments.append(segment)
        return segment

    def _free_files(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.folder.glob(f"{_FREE_PREFIX}*.log"):
            with contextlib.suppress(FileNotFoundError):
                found.append((path.stat().st_size, path))
        return sorted(found, reverse=True)

    def _free_file(self, least: int) -> Path | None:
        """The largest free file, if it holds ``least`` bytes."""
        files = self._free_files()
        return files[0][1] if files and files[0][0] >= least else None

    def free_segments(self) -> int:
        """Free segment files of the full size ready for reuse."""
        return sum(1 for size, _ in self._free_files() if size >= self.segment_bytes)

    def prepare_spare(self) -> None:
        """Zero-fill one more free segment file (the next size) if fewer than
        :data:`SPARE_LOW` are ready (at most ``pool_size``); the checkpoint thread calls it
        after a segment was taken, so that the store filling the next one does not wait
        for it."""
        self.spare_wanted.clear()
        if self._closed or len(self._free_files()) >= min(SPARE_LOW, self.pool_size):
            return
        name = f"{_FREE_PREFIX}{self.owner}-x{time.time_ns()}.log"
        _zero_fill(self.folder / name, self.next_size)
        fsync_dir(self.folder)

    def preallocate(self) -> None:
        """Fill the pool with full-size free segments: a node that has been receiving for a
        while has them (benchmarks start from there)."""
        while not self._closed and self.free_segments() < self.pool_size:
            name = f"{_FREE_PREFIX}{self.owner}-x{time.time_ns()}.log"
            _zero_fill(self.folder / name, self.segment_bytes)
        fsync_dir(self.folder)
        self.next_size = self.segment_bytes

    # --- appending ------------------------------------------------------------------

    def append(
        self, buffer: RecordBuffer, *, calling_ae: str, calling_host: str, sha256: str
    ) -> tuple[Segment, int]:
        """Write the instance in ``buffer`` as a record (not yet durable); returns its
        segment and sync ticket for :meth:`wait_durable`.

        The caller must call :meth:`applied` once the spool file and index row are written
        (or refused).  The space is reserved under the lock and written outside it, so
        concurrent stores write at once.  Raises ``OSError`` (the record then counts as
        never written: a reader skips what is not a whole record of its segment)."""
        header = json.dumps(
            {
                "calling_ae": calling_ae,
                "calling_host": calling_host,
                "received_at": time.time(),
                "sha256": sha256,
            }
        ).encode()
        length = _align(BLOCK + buffer.length + len(_END))
        with self._lock:
            if self._closed:
                raise OSError("the receive log is closed")
            segment = self._current
            if segment.size + length > segment.capacity:
                segment = self._rotate(length)
            start = segment.size
            segment.size += length
            segment.in_flight += 1
            self.appended += 1
            record = buffer.record(header, segment.number)
        try:
            _write_all(segment.fd, record, start, segment.direct)
        except OSError:
            with self._lock:
                segment.in_flight -= 1
            raise
        with self._lock:
            ticket = self._syncs_started + 1  # the next sync to start covers this write
            segment.ticket = ticket
            self._dirty.add(segment.number)
        return segment, ticket

    def _rotate(self, length: int) -> Segment:
        self._current.full = True
        self._current = self._open_segment(length)
        self.spare_wanted.set()
        return self._current

    def wait_durable(self, ticket: int) -> None:
        """Block until a sync that started after the write of ``ticket`` has finished.

        Group commit without a thread hand-off: the first store that finds no sync in
        progress syncs every segment written since the last sync itself; stores arriving
        meanwhile wait for it, and the next of them syncs what they wrote.  Raises
        ``OSError``."""
        while True:
            with self._lock:
                while self._syncing and self._syncs_done < ticket:
                    self._synced.wait()
                if self._syncs_done >= ticket:
                    return
                if self._sync_error is not None:
                    raise self._sync_error
                self._syncing = True
                self._syncs_started += 1
                number = self._syncs_started
                targets = [s for s in self._segments if s.number in self._dirty]
                self._dirty.clear()
            try:
                for target in targets:
                    os.fdatasync(target.fd)
            except OSError as exc:
                log.error("receive log sync failed: %s", exc)
                with self._lock:
                    self._sync_error = exc
                    self._syncing = False
                    self._synced.notify_all()
                raise
            with self._lock:
                self._syncs_done = number
                self._syncing = False
                self._synced.notify_all()

    def applied(self, segment: Segment, spooled: Path | None) -> None:
        """The store that appended to ``segment`` wrote ``spooled`` (None: a duplicate or
        refused)."""
        with self._lock:
            segment.in_flight -= 1
            if spooled is not None:
                segment.written.append(spooled)

    # --- checkpoints ----------------------------------------------------------------

    def checkpoint_begin(self) -> tuple[list[Path], list[Segment]]:
        """What a checkpoint makes durable: the spool files written since the previous
        one (taken from the list), and the full segments whose stores have all been
        applied (to :meth:`retire` once those files and the index are durable)."""
        with self._lock:
            files = [p for s in self._segments for p in s.written]
            for s in self._segments:
                s.written = []
            done = [
                s
                for s in self._segments
                if s.full and s.in_flight == 0 and s.ticket <= self._syncs_done
            ]
            return files, done

    def retire(self, segments: list[Segment]) -> None:
        """Full segments whose instances are durable in the spool and the index: kept for
        reuse (renamed ``free-...``) or deleted."""
        with self._lock:
            pool = len(self._free_files())
            for segment in segments:
                self._segments.remove(segment)
                os.close(segment.fd)
                if segment.capacity <= self.segment_bytes and pool < self.pool_size:
                    os.replace(segment.path, self.folder / f"{_FREE_PREFIX}{segment.path.name}")
                    pool += 1
                else:
                    segment.path.unlink(missing_ok=True)
        if segments:
            fsync_dir(self.folder)

    def close(self) -> list[Segment]:
        """No more appends; returns the segments left (the caller retires them once their
        instances are durable)."""
        with self._lock:
            self._closed = True
            for segment in self._segments:
                segment.full = True
            return list(self._segments)


def _next_number(folder: Path) -> int:
    numbers = [_number(p) for p in folder.glob("*.log") if not p.name.startswith(_FREE_PREFIX)]
    return max(numbers, default=0)


def _number(path: Path) -> int:
    try:
        return int(path.stem.rsplit("-", 1)[-1])
    except ValueError:
        return 0


#: What segments are filled with: an anonymous mapping, page-aligned and never written.
_ZEROS = mmap.mmap(-1, 2**20)


def _zero_fill(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes, synced; nothing is left of it when that fails (a full
    disk must not lose its last bytes to a spare segment).  Written past the page cache
    where the file system allows it: the log is written with ``O_DIRECT`` and so never
    reads these pages, and a fresh page-cache page costs more CPU than its write on
    these machines (64 MiB: 0.20-0.25 s of CPU buffered, 0.01-0.03 s direct)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0) if size % BLOCK == 0 else 0
    try:
        fd = os.open(path, flags | direct, 0o640)
    except OSError:  # no O_DIRECT here (tmpfs)
        fd = os.open(path, flags, 0o640)
    try:
        zeros, offset = memoryview(_ZEROS), 0
        while offset < size:
            offset += os.pwrite(fd, zeros[: min(size - offset, len(zeros))], offset)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def owners(paths: list[Path]) -> set[str]:
    return {p.stem.rsplit("-", 1)[0] for p in paths}


def segment_files(data_dir: Path, owner: str | None = None) -> list[Path]:
    """Live log segments left in ``data_dir`` (of ``owner`` only, if given), in order."""
    folder = data_dir / LOG_DIR
    if not folder.is_dir():
        return []
    paths = [
        p
        for p in folder.glob("*.log")
        if not p.name.startswith(_FREE_PREFIX) and (owner is None or p.name.startswith(f"{owner}-"))
    ]
    return sorted(paths, key=_number)


def read_segment(path: Path) -> Iterator[LogRecord]:
    """The whole records of a segment, in order.  Records start on block boundaries; a
    block that does not start one of this segment's whole records (zeros, a record of the
    file's earlier life, a write that failed or was torn by a crash: its SHA-256 does not
    match) is skipped."""
    data = path.read_bytes()
    number = _number(path)
    offset = 0
    torn = 0
    while offset + _HEAD.size <= len(data):
        record, end = _record_at(data, offset, number)
        if record is None:
            if data[offset : offset + 4] == _MAGIC:
                torn += 1
            offset += BLOCK
            continue
        yield record
        offset = _align(end)
    if torn:
        log.warning("receive log %s: %d torn or foreign record(s) skipped", path.name, torn)


def _record_at(data: bytes, offset: int, number: int) -> tuple[LogRecord | None, int]:
    magic, record_number, header_len, body_len = _HEAD.unpack_from(data, offset)
    if magic != _MAGIC or record_number != number:
        return None, 0
    start = offset + _HEAD.size
    body = offset + BLOCK
    end = body + body_len
    try:
        header = json.loads(data[start : start + header_len])
        record = LogRecord(
            calling_ae=str(header["calling_ae"]),
            calling_host=str(header["calling_host"]),
            received_at=float(header["received_at"]),
            sha256=str(header["sha256"]),
            body=data[body:end],
        )
    except (ValueError, KeyError, TypeError):
        return None, 0
    if data[end : end + len(_END)] != _END:
        return None, 0
    if hashlib.sha256(record.body).hexdigest() != record.sha256:
        return None, 0
    return record, end + len(_END)


def _open_direct(path: Path) -> tuple[int, bool]:
    """The segment for writing, with ``O_DIRECT`` where the file system has it (not
    tmpfs)."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, os.O_WRONLY | direct), True
        except OSError:
            pass
    return os.open(path, os.O_WRONLY), False


def _write_all(fd: int, record: memoryview, offset: int, direct: bool) -> None:
    """Write a whole record at ``offset``; a short write (rare) is completed (in whole
    blocks under ``O_DIRECT``)."""
    while record:
        n = os.pwrite(fd, record, offset)
        if direct and n % BLOCK:
            n -= n % BLOCK
            if n == 0:
                raise OSError(f"short unaligned write at {offset}")
        record, offset = record[n:], offset + n
