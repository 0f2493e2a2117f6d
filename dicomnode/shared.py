"""Counts shared by the node's receiving processes (``[node].receivers``).

A limit the node sets (``max_associations``, the free-space watermark) is the node's, not
each receiving process's, whichever process the kernel hands a connection to.
"""

from __future__ import annotations

import threading
from collections.abc import MutableSequence
from contextlib import AbstractContextManager
from typing import Any


class ProcessCounts:
    """One count per receiving process, in memory they share (made by the node), and their
    total.

    Each process writes only its own slot, and clears it when it starts, so that a
    process killed with something counted leaves nothing behind for its successor.  With
    ``lock`` shared by the processes too, a check of the total and a change of the own
    count made under :attr:`lock` are one step for all of them (:meth:`add`).  Without
    ``slots`` the count is this process's alone."""

    def __init__(
        self,
        slots: MutableSequence[int] | None = None,
        own: int = 0,
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        self._slots: MutableSequence[int] = [0] if slots is None else slots
        self._own = own if slots is not None else 0
        self.lock: AbstractContextManager[Any] = lock if lock is not None else threading.Lock()
        self._slots[self._own] = 0

    def change(self, delta: int) -> None:
        with self.lock:
            self.add(delta)

    def add(self, delta: int) -> None:
        """Change this process's count; the caller holds :attr:`lock`."""
        self._slots[self._own] += delta

    @property
    def total(self) -> int:
        """Every process's."""
        return sum(self._slots[:])

    @property
    def own(self) -> int:
        """This process's."""
        return self._slots[self._own]
