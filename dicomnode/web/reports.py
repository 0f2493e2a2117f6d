"""What the pages show of a job's results, read back from its SR and SEG files.

The findings table comes from the TID 1500 SR itself (what the PACS receives), not from
the job summary: each measurement group (DCM 125007) becomes one row with its tracking
identifier, finding, measurements and qualitative evaluations.  Read with pydicom only
(highdicom stays in ``outputs/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

MEASUREMENT_GROUP = "125007"
TRACKING_IDENTIFIER = "112039"
FINDING = "121071"
FINDING_CATEGORY = "276214006"
#: Units that say nothing next to a number ("{-}" no units, "1" unity).
SILENT_UNITS = frozenset({"{-}", "1"})
#: UCUM codes shown the way readers write them.
UNIT_NAMES = {"[hnsf'U]": "HU", "mm3": "mm³", "mm2": "mm²"}


@dataclass(frozen=True)
class FindingRow:
    """One measurement group of an SR."""

    tracking_id: str
    finding: str
    measurements: tuple[tuple[str, str], ...] = ()
    evaluations: tuple[tuple[str, str], ...] = ()


@dataclass
class ReportSummary:
    """What an SR says: its groups, completion and verification flags."""

    path: Path
    rows: list[FindingRow] = field(default_factory=list)
    completion: str = ""
    verification: str = ""
    error: str = ""


def _code_value(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(keyword)
    return str(seq[0].CodeValue) if seq else ""


def _meaning(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(keyword)
    return str(seq[0].CodeMeaning) if seq else ""


def _number(item: Dataset) -> tuple[str, str]:
    values = item.get("MeasuredValueSequence")
    if not values:
        return _meaning(item), "(no value)"
    value = values[0]
    number = float(value.NumericValue)
    unit = _code_value(value, "MeasurementUnitsCodeSequence")
    text = f"{number:.4g}" if abs(number) < 1e4 else f"{number:.0f}"
    if unit and unit not in SILENT_UNITS:
        text = f"{text} {UNIT_NAMES.get(unit, unit)}"
    return _meaning(item), text


def _group_row(group: Dataset) -> FindingRow:
    tracking, finding = "", ""
    measurements: list[tuple[str, str]] = []
    evaluations: list[tuple[str, str]] = []
    for item in group.get("ContentSequence", []):
        kind, code = item.get("ValueType", ""), _code_value(item)
        if kind == "TEXT" and code == TRACKING_IDENTIFIER:
            tracking = str(item.TextValue)
        elif kind == "CODE" and code == FINDING:
            finding = _meaning(item, "ConceptCodeSequence")
        elif kind == "CODE" and code != FINDING_CATEGORY:
            evaluations.append((_meaning(item), _meaning(item, "ConceptCodeSequence")))
        elif kind == "NUM":
            measurements.append(_number(item))
    return FindingRow(tracking, finding, tuple(measurements), tuple(evaluations))


def _groups(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "CONTAINER":
            if _code_value(child) == MEASUREMENT_GROUP:
                yield child
            else:
                yield from _groups(child)


def read_report(path: Path) -> ReportSummary:
    """The measurement groups of the SR at ``path`` (an unreadable file: ``error`` says why)."""
    summary = ReportSummary(path)
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        summary.error = f"cannot read {path.name}: {exc}"
        return summary
    summary.completion = str(ds.get("CompletionFlag", ""))
    summary.verification = str(ds.get("VerificationFlag", ""))
    try:
        summary.rows = [_group_row(g) for g in _groups(ds)]
    except (AttributeError, ValueError, TypeError) as exc:
        summary.error = f"unexpected content in {path.name}: {exc}"
    return summary
