"""Segmentations sent back to the node: the only module that runs SQL on ``feedback``.

A radiologist corrects the node's SEG in a viewer (3D Slicer, OHIF) and sends the corrected
SEG to the node.  Like every object that is not an image, it is stored and never drives
processing (``spool.header.drives_processing``); in addition, the receive step
(:mod:`dicomnode.net.receive`) notes every Segmentation that the node did not make (its
SOP Instance UID is not under the node's root) here, from the UIDs it has already read:
one row, no decoding.  Whether it is a correction of the node's work, and of which model
version, is decided later, away from the receive path (:mod:`dicomnode.feedback.collect`),
which settles the row::

    received -> accepted   (it references a series the node processed: training data)
    received -> rejected   (it does not, or it is the node's own object: why is kept)

A row keeps the arrival's provenance (calling AE title and host, time) from the start;
an accepted one also its training copy (``path``, relative to the data directory) and
what it corrects (``provenance``: study, series, job, the node's SEG and model version).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydicom.uid import SegmentationStorage

from dicomnode.db import Database
from dicomnode.spool.index import InstanceHeader
from dicomnode.states import check_transition
from dicomnode.uids import is_own_uid


class FeedbackState(StrEnum):
    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


FEEDBACK_TRANSITIONS: dict[FeedbackState, frozenset[FeedbackState]] = {
    FeedbackState.RECEIVED: frozenset({FeedbackState.ACCEPTED, FeedbackState.REJECTED}),
    FeedbackState.ACCEPTED: frozenset(),
    FeedbackState.REJECTED: frozenset(),
}


@dataclass(frozen=True)
class FeedbackRecord:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str
    calling_host: str
    received_at: float
    state: FeedbackState
    settled_at: float | None
    reason: str
    #: The training copy, relative to the data directory ("" until accepted).
    path: str
    provenance: dict[str, Any] = field(default_factory=dict)


def is_feedback_candidate(header: InstanceHeader) -> bool:
    """A Segmentation the node did not make: perhaps a correction of one it did."""
    return header.sop_class_uid == SegmentationStorage and not is_own_uid(header.sop_instance_uid)


def _record(row: sqlite3.Row) -> FeedbackRecord:
    fields = dict(row)
    fields["state"] = FeedbackState(fields["state"])
    fields["provenance"] = json.loads(fields["provenance"] or "{}")
    return FeedbackRecord(**fields)


class FeedbackInbox:
    """The ``feedback`` table: what came back, and what became of it."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def note(
        self, header: InstanceHeader, *, calling_ae: str, calling_host: str, durable: bool = True
    ) -> bool:
        """Record a candidate as it is stored (a second copy of it changes nothing);
        returns whether it was new.  ``durable=False`` on the receive log's path, which
        replays the instance (and so this note) after a crash."""
        with self.db.transaction(durable=durable) as conn:
            cursor = conn.execute(
                """INSERT OR IGNORE INTO feedback (sop_instance_uid, sop_class_uid,
                   study_instance_uid, series_instance_uid, calling_ae, calling_host,
                   received_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    header.sop_instance_uid,
                    header.sop_class_uid,
                    header.study_instance_uid,
                    header.series_instance_uid,
                    calling_ae,
                    calling_host,
                    time.time(),
                    str(FeedbackState.RECEIVED),
                ),
            )
            return cursor.rowcount == 1

    def records(
        self, state: FeedbackState | str | None = None, limit: int = 1000, *, newest: bool = False
    ) -> list[FeedbackRecord]:
        """Rows, oldest first (the ``limit`` oldest, or with ``newest`` the ``limit``
        newest); only those in ``state`` when given."""
        where, args = ("WHERE state = ?", [str(state)]) if state else ("", [])
        order = "DESC" if newest else "ASC"
        rows = self.db.connect().execute(
            f"SELECT * FROM feedback {where} ORDER BY received_at {order}, id {order} LIMIT ?",
            (*args, limit),
        )
        found = [_record(r) for r in rows.fetchall()]
        return found[::-1] if newest else found

    def for_study(self, study_uid: str) -> list[FeedbackRecord]:
        """A study's rows, oldest first."""
        rows = self.db.connect().execute(
            "SELECT * FROM feedback WHERE study_instance_uid = ? ORDER BY received_at, id",
            (study_uid,),
        )
        return [_record(r) for r in rows.fetchall()]

    def get(self, feedback_id: int) -> FeedbackRecord:
        row = (
            self.db.connect()
            .execute("SELECT * FROM feedback WHERE id = ?", (feedback_id,))
            .fetchone()
        )
        if row is None:
            raise KeyError(f"no feedback {feedback_id}")
        return _record(row)

    def settle(
        self,
        feedback_id: int,
        state: FeedbackState,
        *,
        reason: str = "",
        path: str = "",
        provenance: dict[str, Any] | None = None,
    ) -> None:
        """received -> accepted (with its training copy and provenance) | rejected (why)."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT state FROM feedback WHERE id = ?", (feedback_id,)).fetchone()
            if row is None:
                raise KeyError(f"no feedback {feedback_id}")
            old = FeedbackState(row["state"])
            check_transition(FEEDBACK_TRANSITIONS, f"feedback {feedback_id}", old, state)
            conn.execute(
                "UPDATE feedback SET state = ?, settled_at = ?, reason = ?, path = ?, "
                "provenance = ? WHERE id = ?",
                (
                    str(state),
                    time.time(),
                    reason[:2000],
                    path,
                    json.dumps(provenance or {}, sort_keys=True),
                    feedback_id,
                ),
            )

    def counts(self) -> dict[str, int]:
        rows = self.db.connect().execute("SELECT state, COUNT(*) FROM feedback GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows.fetchall()}
