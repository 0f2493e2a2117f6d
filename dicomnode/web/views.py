"""What the worklist, study and jobs pages show, read through the owners of the tables.

A study's state on the worklist combines the study row (receiving, complete, ignored) with
its current jobs (those of the study's generation): queued or running -> ``processing``,
results going out -> ``sending``, all delivered -> ``done``, any failed -> ``failed``.
Studies are sorted by priority (highest first), then newest first.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicomnode.delivery.store import OutboxItem
from dicomnode.jobs.store import Job, JobState
from dicomnode.spool.index import InstanceRecord, StudyRecord, StudyState

#: Priority names by rank; a job without a priority is routine.
PRIORITY_NAMES = {0: "routine", 1: "high", 2: "stat"}
PRIORITY_RANKS = {name: rank for rank, name in PRIORITY_NAMES.items()}
#: Triage priorities of the results on the same scale (urgent findings rank with STAT).
TRIAGE_RANKS = {"routine": 0, "review": 1, "urgent": 2}
HEADER_TAGS = [
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "StudyDescription",
    "StudyDate",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
]


def priority_of(job: Job) -> str:
    """The job's request priority by name: ``priority`` or ``request_priority`` where the
    job has one, else ``routine``."""
    value = getattr(job, "priority", None)
    if value is None:
        value = getattr(job, "request_priority", 0)
    if isinstance(value, int):
        return PRIORITY_NAMES.get(value, str(value))
    return str(value).lower() or "routine"


def priority_rank(name: str) -> int:
    return PRIORITY_RANKS.get(name, 0)


@dataclass(frozen=True)
class Header:
    """Identifying attributes of one instance (shown to the operator, never logged)."""

    patient_name: str = ""
    patient_id: str = ""
    accession: str = ""
    study_description: str = ""
    study_date: str = ""
    modality: str = ""
    series_description: str = ""
    series_number: str = ""


@lru_cache(maxsize=4096)
def read_header(path: Path) -> Header:
    """The :class:`Header` of a spooled file (cached: spooled files never change)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (OSError, InvalidDicomError):
        return Header()
    values = [str(ds.get(k, "") or "") for k in HEADER_TAGS]
    return Header(
        patient_name=values[0],
        patient_id=values[1],
        accession=values[2],
        study_description=values[3],
        study_date=values[4],
        modality=values[5],
        series_description=values[6],
        series_number=values[7],
    )


@dataclass(frozen=True)
class SeriesRow:
    series_instance_uid: str
    modality: str
    description: str
    number: str
    images: int
    drives: bool


def series_rows(instances: list[InstanceRecord]) -> list[SeriesRow]:
    """One row per series (the header of its first instance)."""
    by_series: dict[str, list[InstanceRecord]] = {}
    for instance in instances:
        by_series.setdefault(instance.series_instance_uid, []).append(instance)
    rows = []
    for uid, members in by_series.items():
        header = read_header(members[0].path)
        rows.append(
            SeriesRow(
                uid,
                header.modality,
                header.series_description,
                header.series_number,
                len(members),
                any(m.drives for m in members),
            )
        )
    return rows


def current_jobs(study: StudyRecord, jobs: list[Job]) -> list[Job]:
    """The jobs of the study's current generation (all of them if none is of it)."""
    return [j for j in jobs if j.generation == study.generation] or jobs


def display_state(study: StudyRecord, jobs: list[Job]) -> tuple[str, str]:
    """(state, why) as the worklist shows it."""
    if study.state == StudyState.RECEIVING:
        return "receiving", study.last_error
    if study.state == StudyState.IGNORED:
        return "ignored", study.note or "no route matched"
    current = current_jobs(study, jobs)
    states = {j.state for j in current}
    if not current:
        return "complete", study.note
    if states & {JobState.QUEUED, JobState.RUNNING}:
        return "processing", ""
    if JobState.SENDING in states:
        return "sending", ""
    failed = [j for j in current if j.state == JobState.FAILED]
    if failed:
        return "failed", failed[0].last_error
    notes = [j.last_error for j in current if j.last_error]
    return "done", notes[0] if notes else ""


def findings_text(job: Job) -> list[str]:
    """Short lines about a job's findings, from its summary."""
    try:
        summary: dict[str, Any] = json.loads(job.summary or "{}")
    except ValueError:
        return []
    lines = []
    for series in summary.get("series", []):
        findings = series.get("findings", [])
        if findings:
            sizes = ", ".join(f"{f['longest_diameter_mm']:g} mm" for f in findings)
            lines.append(f"{len(findings)} finding(s): {sizes}")
        elif "findings" in series:
            lines.append("no findings")
        for c in series.get("classifications", []):
            verdict = "positive" if c.get("positive") else "negative"
            lines.append(f"{c['label']}: {verdict} ({c['probability']:.2f})")
    for failed in summary.get("failed", []):
        lines.append(f"series not processed: {failed.get('error', '')}")
    return lines


@dataclass(frozen=True)
class DeliveryState:
    destination: str
    text: str
    state: str


def delivery_states(jobs: list[Job], items: list[OutboxItem]) -> list[DeliveryState]:
    """Per destination of the jobs: how far their result files are."""
    rows = []
    for destination in sorted({d for j in jobs for d in j.destinations}):
        mine = [i for i in items if i.destination == destination]
        counts = Counter(str(i.state) for i in mine)
        if not mine:
            rows.append(DeliveryState(destination, "nothing yet", "waiting"))
            continue
        text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        errors = [i.last_error for i in mine if i.last_error and str(i.state) != "done"]
        if errors:
            text += f": {errors[0]}"
        state = next(
            (s for s in ("dead", "sending", "pending") if counts.get(s)),
            "done",
        )
        rows.append(DeliveryState(destination, text, state))
    return rows


@dataclass
class StudyRow:
    """A worklist line."""

    study: StudyRecord
    header: Header
    state: str
    why: str
    priority: str
    triage: str
    series: list[SeriesRow]
    findings: list[str]
    deliveries: list[DeliveryState] = field(default_factory=list)

    @property
    def sort_key(self) -> tuple[int, int, float]:
        """The most pressing first: a STAT request or an urgent AI finding (then HIGH or
        review), the other of the two next, then the newest."""
        ranks = (priority_rank(self.priority), TRIAGE_RANKS.get(self.triage, 0))
        return (-max(ranks), -min(ranks), -self.study.first_received_at)


def study_priority(jobs: list[Job]) -> str:
    names = [priority_of(j) for j in jobs] or ["routine"]
    return max(names, key=priority_rank)


def triage_of(jobs: list[Job]) -> str:
    """The results' triage priority where the jobs carry one ("" otherwise)."""
    return next((str(t) for j in jobs if (t := getattr(j, "triage_priority", ""))), "")
