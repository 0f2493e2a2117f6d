"""Match a study's series against the configured routes, and explain the outcome."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.routing.rules import SeriesInfo, SeriesRule, Verdict, evaluate

log = logging.getLogger(__name__)


class RouteLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def pipeline(self) -> str: ...
    @property
    def destinations(self) -> tuple[str, ...]: ...
    @property
    def rule(self) -> SeriesRule: ...


@dataclass(frozen=True)
class RouteMatch:
    route: str
    pipeline: str
    destinations: tuple[str, ...]
    series_uids: tuple[str, ...]


@dataclass(frozen=True)
class Explanation:
    route: str
    series_uid: str
    series_description: str
    verdict: Verdict


def explicit_sop_classes(routes: Sequence[RouteLike]) -> frozenset[str]:
    """SOP classes a route asks for by name (``SOPClassUID = "..."`` or ``{ in = [...] }``):
    instances of these drive processing even when they are not images."""
    found: set[str] = set()
    for route in routes:
        for alternative in route.rule.alternatives:
            for c in alternative:
                if c.keyword != "SOPClassUID" or c.negate:
                    continue
                if c.operator == "equals":
                    found.add(str(c.operand))
                elif c.operator == "in":
                    found.update(str(v) for v in c.operand)
    return frozenset(found)


#: Attributes that say how urgent the request is (PS3.3 C.4.10, C.4.11, C.30.2), read at
#: the top level or from the first Request Attributes Sequence item that has them.
REQUEST_PRIORITY_KEYWORDS = (
    "RequestedProcedurePriority",
    "ScheduledProcedureStepPriority",
    "StudyPriorityID",
)


def _attributes(ds: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.keyword and elem.VR != "SQ" and elem.tag.group not in (0x7FE0,):
            value = elem.value
            out[elem.keyword] = list(value) if type(value).__name__ == "MultiValue" else value
    for item in ds.get("RequestAttributesSequence", None) or []:
        for keyword in REQUEST_PRIORITY_KEYWORDS:
            if keyword not in out and item.get(keyword):
                out[keyword] = item.get(keyword)
    return out


def request_priority(infos: Iterable[SeriesInfo]) -> str:
    """The most pressing request priority the series' headers state: ``STAT``, ``HIGH`` or
    ``ROUTINE`` (also for MEDIUM, LOW or none)."""
    found = {
        str(info.attributes.get(k) or "").strip().upper()
        for info in infos
        for k in REQUEST_PRIORITY_KEYWORDS
    }
    return next((p for p in ("STAT", "HIGH") if p in found), "ROUTINE")


def series_infos(files: Iterable[tuple[str, Path]]) -> list[SeriesInfo]:
    """SeriesInfo per series from (series_uid, path) pairs; reads one header per series."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for series_uid, path in files:
        groups[series_uid].append(path)
    infos = []
    for uid, paths in groups.items():
        ds = dcmread(paths[0], stop_before_pixels=True)
        infos.append(SeriesInfo(uid, _attributes(ds), len(paths)))
    return infos


def scan_folder(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """Group the DICOM files under ``folder`` as study -> series -> paths (others skipped)."""
    studies: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
            )
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except Exception as exc:
            log.warning("skipping %s: not a readable DICOM file (%s)", path, exc)
            continue
        studies[study][series].append(path)
    return {k: dict(v) for k, v in studies.items()}


def match_routes(routes: Sequence[RouteLike], infos: Sequence[SeriesInfo]) -> list[RouteMatch]:
    """Every route with at least one matching series, with the series it selected."""
    matches = []
    for route in routes:
        selected = tuple(i.series_instance_uid for i in infos if evaluate(route.rule, i).matched)
        if selected:
            matches.append(RouteMatch(route.name, route.pipeline, route.destinations, selected))
    return matches


def explain(routes: Sequence[RouteLike], infos: Sequence[SeriesInfo]) -> list[Explanation]:
    return [
        Explanation(
            route.name,
            info.series_instance_uid,
            str(info.attributes.get("SeriesDescription", "")),
            evaluate(route.rule, info),
        )
        for route in routes
        for info in infos
    ]
