"""The receive log: records, group commit, reuse of segments, and recovery from what an
unclean stop left (acknowledged instances come back; torn ones are recognised)."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import SegmentationStorage

from dicomnode.db import Database
from dicomnode.errors import OutOfResourcesError
from dicomnode.shared import ProcessCounts, ProcessLock
from dicomnode.spool import journal, store
from dicomnode.spool.feedback import FeedbackInbox
from dicomnode.spool.header import read_header
from dicomnode.spool.index import Index
from dicomnode.spool.journal import LOG_DIR, ReceiveLog, RecordBuffer, read_segment
from dicomnode.spool.store import Spool, StoreOutcome


def _spool(data: Path) -> Spool:
    """A spool whose checkpoints happen only when a test says (the crash cases)."""
    return Spool(data, Index(Database(data)), min_free_bytes=0, checkpoint_interval_s=3600)


def _buffer(body: bytes) -> RecordBuffer:
    buffer = RecordBuffer(1024)
    buffer.extend(body)
    return buffer


def _log(spool: Spool, body: bytes) -> store.Pending:
    """An instance into the spool's receive log, as the fast path logs it (not yet durable,
    not yet spooled)."""
    buffer = spool.buffers.take()
    buffer.extend(body)
    return spool.log_instance(
        buffer,
        calling_ae="PACS",
        calling_host="127.0.0.1",
        header=read_header(body),
        sha256=hashlib.sha256(body).hexdigest(),
    )


def _append(log: ReceiveLog, body: bytes) -> None:
    """Append, sync and mark applied: a store that went all the way."""
    segment, ticket = log.append(
        _buffer(body), calling_ae="A", calling_host="h", sha256=hashlib.sha256(body).hexdigest()
    )
    log.wait_durable(ticket)
    log.applied(segment, None)


def test_records_are_read_back_and_a_reused_segment_forgets_its_earlier_life(
    tmp_path: Path,
) -> None:
    log = ReceiveLog(tmp_path, segment_bytes=2**20)
    bodies = [os.urandom(n) for n in (10, 5000, 300_000, 4096)]
    for body in bodies:
        _append(log, body)
    (path,) = journal.segment_files(tmp_path)
    assert [r.body for r in read_segment(path)] == bodies
    # When the segment fills, is checkpointed and reused under a new number
    big = os.urandom(800_000)
    _append(log, big)
    _, done = log.checkpoint_begin()
    assert [s.path for s in done] == [path]
    log.retire(done)
    assert not path.exists()
    log.prepare_spare()
    again = os.urandom(1000)
    for _ in range(2):  # fills the second segment, then takes the reused one
        _append(log, big)
    _append(log, again)
    newest = journal.segment_files(tmp_path)[-1]
    # Then reading it yields only what was written in its new life
    assert [r.body for r in read_segment(newest)] == [big, again]


def test_a_burst_takes_the_ready_segments_and_zero_fills_only_near_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a log of 1 MiB segments with its pool of 4 ready (as on a busy node)
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 2**20)
    log = ReceiveLog(tmp_path, segment_bytes=2**20)
    log.preallocate()
    assert log.free_segments() == journal.POOL_SIZE == 4
    filled: list[Path] = []
    real = journal._zero_fill
    monkeypatch.setattr(journal, "_zero_fill", lambda p, n: filled.append(p) or real(p, n))
    big = os.urandom(900_000)
    # When a burst fills segment after segment (the checkpoint thread asked for a spare each time)
    free = []
    for _ in range(4):  # the first record goes into the segment the log opened with
        _append(log, big)
        log.prepare_spare()
        free.append(log.free_segments())
    # Then the next two took ready segments and wrote no zeros; the pool refills below 2
    assert free == [4, 3, 2, 2] and len(filled) == 1
    # and the retired segments come back to the pool instead of being deleted
    _, done = log.checkpoint_begin()
    log.retire(done)
    assert log.free_segments() == 4 and len(filled) == 1


def test_a_torn_record_is_skipped_and_the_records_after_it_still_read(tmp_path: Path) -> None:
    log = ReceiveLog(tmp_path, segment_bytes=2**20)
    bodies = [os.urandom(9000) for _ in range(3)]
    for body in bodies:
        _append(log, body)
    (path,) = journal.segment_files(tmp_path)
    # When a crash tore the first record (part of its body never reached the disk)
    with open(path, "r+b") as f:
        f.seek(journal.BLOCK + 100)
        f.write(bytes(500))
    # Then it is skipped and the others are whole
    assert [r.body for r in read_segment(path)] == bodies[1:]


def test_concurrent_stores_share_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = ReceiveLog(tmp_path, segment_bytes=16 * 2**20)
    syncs = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(journal.os, "fdatasync", counted)
    body = os.urandom(200_000)

    def store() -> None:
        for _ in range(10):
            _, ticket = log.append(
                _buffer(body),
                calling_ae="A",
                calling_host="h",
                sha256=hashlib.sha256(body).hexdigest(),
            )
            log.wait_durable(ticket)

    threads = [threading.Thread(target=store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 40 durable appends, each covered by a sync, far fewer syncs than appends
    assert 0 < len(syncs) < 40


def test_recovery_restores_acknowledged_instances_the_spool_never_got(
    tmp_path: Path, phantom_files: list[Path]
) -> None:
    data = tmp_path / "data"
    spool = _spool(data)
    encoded = [p.read_bytes() for p in phantom_files[:4]]
    # Given instances acknowledged (in the log, synced) whose spooling a crash prevented
    for body in encoded:
        spool.wait_durable(_log(spool, body))
    assert spool.index.instance_count(read_header(encoded[0]).study_instance_uid) == 0
    # When the node starts again
    again = _spool(data)
    restored = again.recover()
    # Then each is in the spool and the index, byte for byte, and the log is gone
    assert restored == 4
    for body in encoded:
        (row,) = again.index.instance_versions(read_header(body).sop_instance_uid)
        assert row.path.read_bytes() == body
        assert row.calling_ae == "PACS"
    assert journal.segment_files(data) == []
    assert again.recover() == 0


def test_recovery_notes_a_segmentation_from_elsewhere_as_feedback(
    tmp_path: Path, phantom_files: list[Path]
) -> None:
    """A SEG another system made is noted for feedback as it is spooled; a crash between
    the acknowledgement and the spooling must not lose that note."""
    data = tmp_path / "data"
    spool = _spool(data)
    ds = dcmread(phantom_files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9.10"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    body = out.getvalue()
    buffer = spool.buffers.take()
    buffer.extend(body)
    pending = spool.log_instance(
        buffer,
        calling_ae="VIEWER",
        calling_host="127.0.0.1",
        header=read_header(body),
        sha256=hashlib.sha256(body).hexdigest(),
    )
    spool.wait_durable(pending)
    # When the node starts again after the crash
    again = _spool(data)
    assert again.recover() == 1
    # Then the SEG is in the index and noted, with who sent it
    (note,) = FeedbackInbox(again.index.db).records()
    assert (note.sop_instance_uid, note.calling_ae) == ("1.2.3.4.5.6.7.8.9.10", "VIEWER")
    assert again.index.instance_versions(note.sop_instance_uid)


def test_recovery_rewrites_a_torn_spool_file_and_drops_a_never_acknowledged_row(
    tmp_path: Path, phantom_files: list[Path]
) -> None:
    data = tmp_path / "data"
    spool = _spool(data)
    first, second = (p.read_bytes() for p in phantom_files[:2])
    # Given two instances spooled after the last checkpoint
    for body in (first, second):
        assert (
            spool.store(body, calling_ae="PACS", calling_host="h", header=read_header(body))
            == StoreOutcome.STORED
        )
    rows = [
        spool.index.instance_versions(read_header(b).sop_instance_uid)[0] for b in (first, second)
    ]
    # ... and a power cut that tore both spool files and the second's log record
    for row in rows:
        row.path.write_bytes(row.path.read_bytes()[:1000])
    (segment,) = journal.segment_files(data)
    records = list(read_segment(segment))
    assert len(records) == 2
    raw = bytearray(segment.read_bytes())
    second_at = raw.index(b"DNRL", journal.BLOCK)
    raw[second_at + journal.BLOCK + 500 : second_at + journal.BLOCK + 510] = b"\xff" * 10
    segment.write_bytes(bytes(raw))
    assert [r.body for r in read_segment(segment)] == [first]
    # When the node starts again
    again = _spool(data)
    again.recover()
    # Then the first (its record is whole: it may have been acknowledged) is rewritten,
    # the second (never acknowledged: its sync had not returned) is forgotten
    assert rows[0].path.read_bytes() == first
    assert again.index.instance_versions(rows[1].sop_instance_uid) == []
    assert not (data / LOG_DIR / segment.name).exists()


def test_a_clean_close_leaves_no_live_segment(tmp_path: Path, phantom_files: list[Path]) -> None:
    spool = _spool(tmp_path)
    for path in phantom_files[:3]:
        body = path.read_bytes()
        spool.store(body, calling_ae="PACS", calling_host="h", header=read_header(body))
    started = time.monotonic()
    spool.close()
    # The checkpoint thread is woken, not waited for until its interval (an hour here)
    assert time.monotonic() - started < 10
    assert journal.segment_files(tmp_path) == []
    assert _spool(tmp_path).recover() == 0


def test_space_is_held_for_acknowledged_instances_until_they_are_spooled(
    tmp_path: Path, phantom_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    spool = _spool(data)
    spool.receive_log()  # its segment is written before the free space is pinned
    bodies = [p.read_bytes() for p in phantom_files[:3]]
    # Given a disk with room for one instance, its spool file and its index row
    need = len(bodies[0]) + len(bodies[0]) // 8 + store.INDEX_SLACK
    monkeypatch.setattr(Spool, "free_bytes", lambda self: need + need // 2)

    # When one is acknowledged (logged) and another comes before the first is spooled
    first = _log(spool, bodies[0])
    spool.wait_durable(first)
    # Then the second is refused: the first's spool file is not on the disk yet, but its
    # space is taken
    with pytest.raises(OutOfResourcesError):
        _log(spool, bodies[1])
    # And once the first is spooled, its space is the disk's again
    assert spool.spool_logged(first) is StoreOutcome.STORED
    spool.wait_durable(_log(spool, bodies[2]))


def test_spool_files_from_the_log_are_written_past_the_page_cache_byte_for_byte(
    tmp_path: Path, phantom_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[tuple[int, int]] = []
    real = store.write_direct

    def spy(final: Path, padded: memoryview, length: int, tmp: Path | None = None) -> Path:
        written.append((len(padded), length))
        return real(final, padded, length, tmp)

    monkeypatch.setattr(store, "write_direct", spy)
    spool = _spool(tmp_path)
    bodies = [p.read_bytes() for p in phantom_files[:3]]
    for body in bodies:
        spool.store(body, calling_ae="PACS", calling_host="h", header=read_header(body))
    # Each spool file went through the direct write, whole blocks of the buffer cut to the
    # instance's length, and holds the instance exactly
    assert [length for _, length in written] == [len(b) for b in bodies]
    assert all(size % journal.BLOCK == 0 and size >= length for size, length in written)
    for body in bodies:
        (row,) = spool.index.instance_versions(read_header(body).sop_instance_uid)
        assert row.path.read_bytes() == body
    spool.close()


def test_space_held_by_one_receiving_process_counts_for_the_others(
    tmp_path: Path, phantom_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two receiving processes' spools on one data directory, sharing their held
    # space as the node sets them up ([node] receivers = 2: shared memory, a locked file)
    data = tmp_path / "data"
    data.mkdir()
    slots = multiprocessing.get_context("spawn").RawArray("q", 2)

    def spool_of(n: int) -> Spool:
        held = ProcessCounts(slots, n, ProcessLock(data / "held.lock"), clear=False)
        return Spool(
            data,
            Index(Database(data)),
            min_free_bytes=0,
            checkpoint_interval_s=3600,
            log_owner=str(n),
            held=held,
        )

    spools = [spool_of(0), spool_of(1)]
    for spool in spools:
        spool.receive_log()  # segments written before the free space is pinned
    bodies = [p.read_bytes() for p in phantom_files[:4]]
    # and a disk with room for one instance, its spool file and its index row
    need = len(bodies[0]) + len(bodies[0]) // 8 + store.INDEX_SLACK
    monkeypatch.setattr(Spool, "free_bytes", lambda self: need + need // 2)
    # When the first process acknowledges one and the second gets another before the
    # first is spooled
    first = _log(spools[0], bodies[0])
    spools[0].wait_durable(first)
    # Then the second process refuses it: the space is the node's
    with pytest.raises(OutOfResourcesError):
        _log(spools[1], bodies[1])
    assert slots[:] == [first.reserved, 0]
    # And once the first is spooled, the second process may take the next one
    assert spools[0].spool_logged(first) is StoreOutcome.STORED
    third = _log(spools[1], bodies[2])
    spools[1].wait_durable(third)
    # When the second process dies with that instance acknowledged and not spooled, its
    # successor counts what it held until it has replayed its receive log
    successor = spool_of(1)
    assert slots[:] == [0, third.reserved]
    assert successor.recover("1") == 1
    assert slots[:] == [0, 0]
    (row,) = successor.index.instance_versions(read_header(bodies[2]).sop_instance_uid)
    assert row.path.read_bytes() == bodies[2]


@pytest.mark.parametrize("size", [journal.BLOCK * 300, 3 * 2**20 + 5])
def test_segments_are_zero_filled_whole(tmp_path: Path, size: int) -> None:
    # Whole blocks go past the page cache; any other size (never asked by the log) is
    # written buffered; either way the file is zeros to its size, synced.
    path = tmp_path / "free-x.log"
    journal._zero_fill(path, size)
    data = path.read_bytes()
    assert len(data) == size and data.count(0) == size
