"""Counts shared by the node's receiving processes (``[node].receivers``).

A limit the node sets (``max_associations``, the free-space watermark) is the node's, not
each receiving process's, whichever process the kernel hands a connection to.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import MutableSequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any


class ProcessLock:
    """A lock for the node's receiving processes that the kernel lets go of when its holder
    dies: ``flock`` on a file (a POSIX semaphore, ``multiprocessing.Lock``, stays taken for
    good when a process is killed holding it, and every receiver would then wait on it).
    The threads of one process take a lock of their own first: an ``flock`` belongs to the
    open file, which they share."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._threads = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def close(self) -> None:
        os.close(self._fd)


class ProcessCounts:
    """One count per receiving process, in memory they share (made by the node), and their
    total.

    Each process writes only its own slot.  It clears it when it starts (``clear``), or once
    it has dealt with what its predecessor left (:meth:`reset`), so that a process killed
    with something counted leaves nothing behind for its successor.  With ``lock`` shared
    by the processes too (a :class:`ProcessLock`), a check of the total and a change of the
    own count made under :attr:`lock` are one step for all of them (:meth:`add`).  Without
    ``slots`` the count is this process's alone."""

    def __init__(
        self,
        slots: MutableSequence[int] | None = None,
        own: int = 0,
        lock: AbstractContextManager[Any] | None = None,
        *,
        clear: bool = True,
    ) -> None:
        self._slots: MutableSequence[int] = [0] if slots is None else slots
        self._own = own if slots is not None else 0
        self.lock: AbstractContextManager[Any] = lock if lock is not None else threading.Lock()
        if clear:
            self._slots[self._own] = 0

    def change(self, delta: int) -> None:
        with self.lock:
            self.add(delta)

    def add(self, delta: int) -> None:
        """Change this process's count; the caller holds :attr:`lock`."""
        self._slots[self._own] += delta

    def reset(self) -> None:
        """This process's count back to 0 (what its predecessor counted is settled)."""
        with self.lock:
            self._slots[self._own] = 0

    @property
    def total(self) -> int:
        """Every process's."""
        return sum(self._slots[:])

    @property
    def own(self) -> int:
        """This process's."""
        return self._slots[self._own]
