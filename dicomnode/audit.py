"""Append-only audit trail (JSON lines): who sent or received what, and when.

One line per event with ``ts`` (UTC, ISO 8601), ``event`` and fields.  Records carry AE
titles, hosts, UIDs, job ids and statuses; never patient names, IDs or birth dates.
The file is opened with ``O_APPEND`` so concurrent writers (the node and its worker
processes) never interleave inside a line, and lines are flushed as written.

Events: ``association`` (accepted / rejected / released), ``instance`` (stored, duplicate,
new_version, refused with status), ``study`` (complete / ignored), ``job`` (state
changes), ``delivery`` (sent / failed with status), ``purge`` (retention).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Keys that must never appear in an audit record (PHI).
FORBIDDEN_KEYS = frozenset(
    {"PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id", "birth_date"}
)


class AuditLog:
    """Writes audit records to ``path``; a ``None`` path makes every call a no-op."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def _open(self) -> int:
        if self._fd is None:
            assert self.path is not None
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return self._fd

    def record(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        bad = FORBIDDEN_KEYS.intersection(fields)
        if bad:
            raise ValueError(f"audit records must not carry PHI ({', '.join(sorted(bad))})")
        entry = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
            "pid": os.getpid(),
            **fields,
        }
        line = (json.dumps(entry, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                os.write(self._open(), line)
            except OSError as exc:
                # A full disk must not turn a stored instance (or a 0xA700) into 0xC211;
                # the gap in the trail is logged instead.
                log.error("audit record %r not written: %s", event, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All records of an audit file (for tests and operators)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
