"""Triage: a pipeline's declarative rules turn its results into a priority.

Each rule of ``[[pipelines]] triage`` names a priority (``urgent`` or ``review``) and one
condition on a finding (segmentation label, longest diameter, volume, count) or on a
classification (label, probability, positive).  A result takes the most pressing priority
whose rule holds for any of its findings or classifications, and ``routine`` when none
does; a job with several series takes the most pressing of its series.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dicomnode.config import TRIAGE_PRIORITIES, TriageCondition, TriageRule
from dicomnode.pipelines.results import PipelineResult

ROUTINE = "routine"


def _name_matches(wanted: str, name: str) -> bool:
    return wanted in ("*", name)


def _holds(condition: TriageCondition, result: PipelineResult) -> bool:
    if condition.classification is not None:
        return any(
            _name_matches(condition.classification, c.label.name)
            and (condition.probability is None or condition.probability.holds(c.probability))
            and (condition.positive is None or condition.positive == c.positive)
            for c in result.classifications
        )
    assert condition.finding is not None
    findings = [
        f
        for f in result.findings
        if _name_matches(condition.finding, f.label.name)
        and (
            condition.longest_diameter_mm is None
            or condition.longest_diameter_mm.holds(f.longest_diameter_mm)
        )
        and (condition.volume_mm3 is None or condition.volume_mm3.holds(f.volume_mm3))
    ]
    if condition.count is not None:
        return condition.count.holds(len(findings))
    return bool(findings)


def most_pressing(priorities: Iterable[str]) -> str:
    """The most pressing of ``priorities`` (``routine`` when there are none)."""
    return min(priorities, key=TRIAGE_PRIORITIES.index, default=ROUTINE)


def evaluate_triage(rules: Sequence[TriageRule], result: PipelineResult) -> str:
    """The priority ``rules`` give ``result``: ``urgent``, ``review`` or ``routine``."""
    return most_pressing(r.priority for r in rules if _holds(r.when, result))
