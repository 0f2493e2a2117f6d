"""State machines: the one check every owner runs before it moves a row.

Each owner declares its states as a ``StrEnum`` and its allowed edges as a transition
table (``spool.index.STUDY_TRANSITIONS``, ``jobs.store.TRANSITIONS``,
``delivery.store.OUTBOX_TRANSITIONS``) and runs its own SQL; this module holds no state.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from dicomnode.errors import TransitionError

S = TypeVar("S", bound=StrEnum)


def check_transition(transitions: Mapping[S, frozenset[S]], what: str, old: S, new: S) -> None:
    """Raise :class:`TransitionError` unless ``old -> new`` is an edge of ``transitions``."""
    if new not in transitions[old]:
        raise TransitionError(f"{what}: {old} -> {new} is not allowed")


def assignments(columns: Mapping[str, object]) -> tuple[str, tuple[object, ...]]:
    """``("a = ?, b = ?", (1, 2))`` for an ``UPDATE ... SET`` of ``columns``."""
    return ", ".join(f"{k} = ?" for k in columns), tuple(columns.values())
