"""Comparing result files of two runs (local and on Ray).

Two runs of the same input write the same bytes except for what highdicom stamps with the
clock or draws at random (outputs/ does not pass them): the creation and content date and
time, the contributing equipment's date and time, and the SEG's Dimension Organization
UID.  :func:`normalized` blanks exactly those and re-encodes; everything else (every other
UID, the pixels, the findings) must be equal byte for byte.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

#: InstanceCreationDate/Time, ContentDate/Time, ContributionDateTime, DimensionOrganizationUID.
VOLATILE = {0x00080012, 0x00080013, 0x00080023, 0x00080033, 0x0018A002, 0x00209164}


def normalized(path: Path) -> bytes:
    ds = dcmread(path)

    def blank(dataset: Dataset, element: DataElement) -> None:
        if element.tag in VOLATILE:
            element.value = ""

    ds.walk(blank)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def result_files(root: Path) -> dict[str, Path]:
    """Every result file under ``root`` (manifests excluded), by relative path."""
    return {
        p.relative_to(root).as_posix(): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parent != root
    }


def manifest_without_hashes(root: Path) -> dict[str, Any]:
    studies = json.loads((root / "manifest.json").read_text())["studies"]
    for entry in studies.values():
        for output in entry.get("outputs", []):
            output.pop("sha256")
    return dict(studies)


def assert_same_results(expected: Path, actual: Path) -> None:
    """``actual`` holds the same result files as ``expected``, equal but for
    :data:`VOLATILE`, and the same manifest but for the files' hashes."""
    want, got = result_files(expected), result_files(actual)
    assert sorted(got) == sorted(want)
    for name, path in want.items():
        if path.suffix == ".dcm":
            assert normalized(got[name]) == normalized(path), name
        else:
            assert got[name].read_bytes() == path.read_bytes(), name
    assert manifest_without_hashes(actual) == manifest_without_hashes(expected)
