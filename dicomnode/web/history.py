"""Every delivery attempt of a job, from the audit trail.

The outbox keeps each file's latest answer; the audit trail (``dicomnode.audit``) keeps
every one: C-STORE answers carry the job id, and failures to reach a destination at all
(no association) carry the destination and the time.  Only the tail of the file is read
(:data:`TAIL_BYTES`), so a page stays fast on a node with a long history.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TAIL_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Attempt:
    ts: str
    destination: str
    outcome: str
    file: str
    status: str
    reason: str


def _tail(path: Path, size: int) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines()
    return lines[1:] if end > size else lines  # the first line may be cut


def delivery_attempts(
    audit_path: Path, job_id: int, destinations: set[str], since: str, until: str | None
) -> list[Attempt]:
    """The job's ``delivery`` records, and its destinations' connection failures between
    ``since`` and ``until`` (ISO 8601 UTC, as the audit writes them)."""
    attempts = []
    for line in _tail(audit_path, TAIL_BYTES):
        if '"delivery"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") != "delivery":
            continue
        ts = str(record.get("ts", ""))
        mine = record.get("job_id") == job_id
        unreached = (
            "job_id" not in record
            and record.get("destination") in destinations
            and ts >= since
            and (until is None or ts <= until)
        )
        if mine or unreached:
            status = record.get("status")
            attempts.append(
                Attempt(
                    ts,
                    str(record.get("destination", "")),
                    str(record.get("outcome", "")),
                    str(record.get("file", f"{record.get('files', '')} file(s)")),
                    "" if status is None else f"0x{int(status):04X}",
                    str(record.get("reason", "") or ""),
                )
            )
    return attempts
