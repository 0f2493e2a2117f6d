"""Durable file writes: a file is whole or absent, before and after a crash.

The one implementation of write-to-temporary, fsync, rename, fsync-the-folder used by the
spool (received instances), the study processor (SEG, SR) and folder delivery.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PART_SUFFIX = ".part"


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    final: Path,
    write: Callable[[BinaryIO], object],
    tmp_dir: Path | None = None,
    *,
    durable: bool = True,
) -> Path:
    """Write ``final`` through ``write(file)``: temporary file, fsync, rename, fsync folder.

    The temporary file (``*.part``) lives in ``tmp_dir`` (same file system) or next to
    ``final``; it is removed when anything fails.  ``durable=False`` skips both fsyncs
    (whole or absent after a crash of the process, not after a power cut: the caller
    holds the bytes durably elsewhere and syncs later).  Raises ``OSError``.
    """
    folder = final.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = (tmp_dir or folder) / f".{uuid.uuid4().hex}{PART_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if durable:
            fsync_dir(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def write_bytes_atomically(
    final: Path, data: bytes | memoryview, tmp_dir: Path | None = None, *, durable: bool = True
) -> Path:
    return write_atomically(final, lambda f: f.write(data), tmp_dir, durable=durable)


def fsync_file(path: Path) -> None:
    """Make a file's content durable (written earlier without a sync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_atomically(src: Path, folder: Path) -> Path:
    """Copy ``src`` into ``folder`` under its own name, durably."""
    with open(src, "rb") as fin:
        return write_atomically(folder / src.name, lambda fout: shutil.copyfileobj(fin, fout))


def remove_partial_files(folder: Path) -> int:
    """Remove ``*.part`` files (hidden ones too) a crash left in ``folder``."""
    count = 0
    if folder.is_dir():
        for p in folder.glob(f"*{PART_SUFFIX}"):
            p.unlink(missing_ok=True)
            count += 1
    return count
