"""The gate between a candidate model and the current one: no metric may get worse.

``dicomnode evaluate CANDIDATE --against CURRENT --data HELD_OUT`` evaluates both on the
same held-out cases (:func:`dicomnode.models.evaluate.evaluate`) and compares every
reported quality metric, label by label (and, for segmentation, size bucket by size
bucket): the candidate is refused when it is worse than the current model on any of them
by more than ``tolerance`` (absolute).  Higher is better for every gated metric but the
volume error, of which the largest absolute value per bucket is gated (lower is better: a
fraction, 0.01 is one percentage point).  A metric the current model has and the candidate
lacks (no lesion of a bucket detected, a ROC without both classes) counts as worse.
Counts (cases, lesions, components) are not quality metrics and are not gated.

One exception: where the current model tells positive from negative no better than chance
at a level (recall + specificity <= 1: it calls every slice positive, say), its recall and
specificity there are a point on the chance diagonal, not a skill, and neither is held
against the candidate (its accuracy, precision, F1 and ROC-AUC still are).  Without it a
model that flags every slice (recall 1.0) could never be replaced by one that finds seven
lesion slices of eight and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Per label, segmentation (:func:`dicomnode.models.metrics.summarise_lesions` and the
#: case scores of :func:`dicomnode.models.evaluate.evaluate_segmentation`).
SEGMENTATION_METRICS = (
    "case_dice_mean",
    "case_dice_median",
    "case_iou_mean",
    "lesion_sensitivity",
    "lesion_precision",
)
#: Per label and lesion size bucket (``by_radius``).
BUCKET_METRICS = ("sensitivity", "precision", "f1", "dice_mean", "dice_median", "dice_min")
#: Per label and lesion size bucket, lower is better.
BUCKET_ERRORS = ("volume_error_abs_max",)
#: Per label, slice and study level (:func:`dicomnode.models.metrics.classification_metrics`);
#: for segmentation, the slice level (the model as a slice detector).
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
DEFAULT_TOLERANCE = 0.01


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def gated_metrics(task: str, summary: Mapping[str, Any]) -> dict[str, float | None]:
    """The metrics the gate compares, by dotted name (``lesion.by_radius.lt_5mm.dice_mean``)."""
    out: dict[str, float | None] = {}
    for label, values in summary.get("labels", {}).items():
        if task == "segmentation":
            for key in SEGMENTATION_METRICS:
                out[f"{label}.{key}"] = _number(values.get(key))
            for bucket, metrics in values.get("by_radius", {}).items():
                for key in (*BUCKET_METRICS, *BUCKET_ERRORS):
                    out[f"{label}.by_radius.{bucket}.{key}"] = _number(metrics.get(key))
            for key in CLASSIFICATION_METRICS:
                out[f"{label}.slice.{key}"] = _number(values.get("slice", {}).get(key))
        else:
            for level in ("slice", "study"):
                for key in CLASSIFICATION_METRICS:
                    out[f"{label}.{level}.{key}"] = _number(values.get(level, {}).get(key))
    return out


def chance_level(task: str, summary: Mapping[str, Any]) -> dict[str, str]:
    """The recall and specificity figures of levels at which the model in ``summary`` is no
    better than chance (recall + specificity <= 1), by dotted name, with why."""
    out: dict[str, str] = {}
    levels = ("slice",) if task == "segmentation" else ("slice", "study")
    for label, values in summary.get("labels", {}).items():
        for level in levels:
            metrics = values.get(level, {})
            recall, specificity = (
                _number(metrics.get("recall")),
                _number(metrics.get("specificity")),
            )
            if recall is not None and specificity is not None and recall + specificity <= 1.0:
                why = (
                    f"the current model is no better than chance per {level} (recall "
                    f"{recall:.3g} + specificity {specificity:.3g} <= 1)"
                )
                out[f"{label}.{level}.recall"] = out[f"{label}.{level}.specificity"] = why
    return out


def lower_is_better(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BUCKET_ERRORS


@dataclass(frozen=True)
class MetricVerdict:
    name: str
    candidate: float | None
    current: float | None
    #: candidate - current (None when either is missing)
    delta: float | None
    worse: bool
    #: Why the metric is not gated, when it is not.
    note: str | None = None


@dataclass(frozen=True)
class GateReport:
    task: str
    tolerance: float
    verdicts: tuple[MetricVerdict, ...]

    @property
    def worse(self) -> list[MetricVerdict]:
        return [v for v in self.verdicts if v.worse]

    @property
    def accepted(self) -> bool:
        return not self.worse

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "tolerance": self.tolerance,
            "accepted": self.accepted,
            "worse": [v.name for v in self.worse],
            "metrics": {
                v.name: {
                    "candidate": v.candidate,
                    "current": v.current,
                    "delta": v.delta,
                    "worse": v.worse,
                    **({"not_gated": v.note} if v.note else {}),
                }
                for v in self.verdicts
            },
        }


def compare(
    task: str,
    candidate: Mapping[str, Any],
    current: Mapping[str, Any],
    tolerance: float = DEFAULT_TOLERANCE,
) -> GateReport:
    """Compare two evaluation summaries of the same task on the same cases."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), not {tolerance}")
    ours, theirs = gated_metrics(task, candidate), gated_metrics(task, current)
    chance = chance_level(task, current)
    verdicts = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if name in chance:
            delta = None if a is None or b is None else a - b
            verdicts.append(MetricVerdict(name, a, b, delta, False, chance[name]))
            continue
        if b is None:
            worse, delta = False, None  # nothing to keep
        elif a is None:
            worse, delta = True, None  # the current model has it; the candidate lost it
        else:
            delta = a - b
            worse = delta > tolerance if lower_is_better(name) else delta < -tolerance
        verdicts.append(MetricVerdict(name, a, b, delta, worse))
    return GateReport(task, tolerance, tuple(verdicts))
