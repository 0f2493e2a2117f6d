"""Writes past the page cache (``write_direct``): exact bytes, whole or absent, and a
file system without ``O_DIRECT`` still gets its file."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from dicomnode import fsutil
from dicomnode.fsutil import DIRECT_BLOCK, PART_SUFFIX, write_direct


def _padded(data: bytes) -> memoryview:
    """``data`` in page-aligned memory, to the next block boundary (as the receive path
    holds an instance)."""
    size = -(-len(data) // DIRECT_BLOCK) * DIRECT_BLOCK
    memory = mmap.mmap(-1, max(size, DIRECT_BLOCK))
    memory[: len(data)] = data
    memory[len(data) : size] = b"\xee" * (size - len(data))  # must not reach the file
    return memoryview(memory)[:size]


def _direct_supported(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    (folder / "probe").unlink()
    return True


@pytest.mark.parametrize("length", [1, DIRECT_BLOCK - 1, DIRECT_BLOCK, DIRECT_BLOCK + 1, 524_441])
def test_the_file_holds_exactly_the_bytes_and_no_temporary_is_left(
    tmp_path: Path, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(length)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    direct = _direct_supported(tmp_path)  # ext4, xfs: the page cache is bypassed
    opened: list[int] = []
    real_open = os.open

    def spy(path: str | Path, flags: int, mode: int = 0o777) -> int:
        opened.append(flags)
        return real_open(path, flags, mode)

    monkeypatch.setattr(fsutil.os, "open", spy)
    final = write_direct(tmp_path / "a" / "b.dcm", _padded(data), length, tmp)
    assert final.read_bytes() == data
    assert list(tmp.iterdir()) == []
    if direct:
        assert opened and opened[0] & os.O_DIRECT


def test_a_file_system_without_o_direct_gets_a_buffered_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file system that refuses O_DIRECT (tmpfs answers EINVAL)
    real_open = os.open

    def no_direct(path: str | Path, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(fsutil.os, "open", no_direct)
    data = os.urandom(10_000)
    final = write_direct(tmp_path / "x.dcm", _padded(data), len(data), tmp_path)
    assert final.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dcm"]


def test_a_file_system_that_refuses_the_direct_transfer_gets_a_buffered_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file system that opens with O_DIRECT but refuses the transfer (EINVAL)
    real_open, direct_fds = os.open, set()

    def remember(path: str | Path, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refuse(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(fsutil.os, "open", remember)
    monkeypatch.setattr(fsutil.os, "pwrite", refuse)
    data = os.urandom(10_000)
    final = write_direct(tmp_path / "x.dcm", _padded(data), len(data), tmp_path)
    assert final.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dcm"]
    assert direct_fds or not _direct_supported(tmp_path)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        write_direct(tmp_path / "x.dcm", _padded(b"abc"), 3, tmp_path)
    assert not any(p.name.endswith(PART_SUFFIX) or p.name == "x.dcm" for p in tmp_path.iterdir())


def test_memory_that_is_not_whole_blocks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_direct(tmp_path / "x.dcm", memoryview(bytearray(100)), 100, tmp_path)
