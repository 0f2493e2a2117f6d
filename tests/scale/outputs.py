"""Comparing the result files of two runs (local and on Ray, one process and a pool).

Two runs of the same input with the same creation time (``--created-at``, or
``run_batch(created=...)``) write the same bytes: UIDs are derived from the input, and
what highdicom would take from the clock or draw at random is pinned
(:func:`dicomnode.outputs.common.make_reproducible`).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

#: The creation time both runs of a comparison write.
CREATED = datetime.datetime(2026, 12, 1, 8, 30, 15, 250000)


def result_files(root: Path) -> dict[str, Path]:
    """Every result file under ``root`` (manifests excluded), by relative path."""
    return {
        p.relative_to(root).as_posix(): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parent != root
    }


def manifest(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / "manifest.json").read_text())["studies"])


def assert_same_results(expected: Path, actual: Path) -> None:
    """``actual`` holds the result files of ``expected``, byte for byte, and the same
    manifest (the files' SHA-256 included)."""
    want, got = result_files(expected), result_files(actual)
    assert sorted(got) == sorted(want)
    assert any(name.endswith(".dcm") for name in want), "nothing to compare"
    for name, path in want.items():
        assert got[name].read_bytes() == path.read_bytes(), name
    assert manifest(actual) == manifest(expected)
