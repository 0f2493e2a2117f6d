"""Evaluation metrics in plain numpy (no TensorFlow, no scipy).

Segmentation: Dice and IoU of a case, connected components (26-connected in 3D), and
lesion-level matching -- a ground-truth lesion is detected when any predicted component
overlaps it; its lesion Dice and volume error are computed against the union of the
predicted components that overlap it; a predicted component overlapping no lesion is a
false positive, counted in the radius bucket of its own size.
Classification: accuracy, precision, recall, specificity, F1, confusion matrix, ROC curve
and ROC-AUC (the Mann-Whitney statistic, ties counted one half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]

#: Equivalent-sphere radius buckets (mm) for lesion-level reporting, disjoint (plotted).
RADIUS_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("lt_3mm", 0.0, 3.0),
    ("3_to_4mm", 3.0, 4.0),
    ("4_to_5mm", 4.0, 5.0),
    ("5_to_10mm", 5.0, 10.0),
    ("ge_10mm", 10.0, math.inf),
)
#: Unions of those, reported beside them.
RADIUS_GROUPS: tuple[tuple[str, float, float], ...] = (
    ("lt_5mm", 0.0, 5.0),
    ("3_to_5mm", 3.0, 5.0),
    ("ge_5mm", 5.0, math.inf),
)


def dice(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Dice coefficient 2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    a, b = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def iou(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Intersection over union |A∩B| / |A∪B|; 1.0 when both are empty."""
    a, b = np.asarray(pred, bool), np.asarray(truth, bool)
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def label_components(mask: npt.ArrayLike) -> tuple[npt.NDArray[np.int32], int]:
    """Label the 26-connected (8 in 2D) components of a boolean array: (labels, count).

    Union-find over the foreground voxels with vectorised hooking and pointer jumping;
    labels are 1..count in order of first voxel (C order), 0 is background.
    """
    m = np.asarray(mask, bool)
    out = np.zeros(m.shape, np.int32)
    flat = np.flatnonzero(m)
    if flat.size == 0:
        return out, 0
    index: npt.NDArray[np.int64] = np.full(m.size, -1, np.int64)
    index[flat] = np.arange(flat.size)
    index = index.reshape(m.shape)
    coords = np.unravel_index(flat, m.shape)
    offsets = [o for o in np.ndindex(*(3,) * m.ndim) if o > (1,) * m.ndim]  # half the stencil
    a_list, b_list = [], []
    for off in offsets:
        delta = np.asarray(off) - 1
        nb = [c + d for c, d in zip(coords, delta, strict=True)]
        ok = np.ones(flat.size, bool)
        for axis, n in enumerate(nb):
            ok &= (n >= 0) & (n < m.shape[axis])
        j = np.full(flat.size, -1, np.int64)
        j[ok] = index[tuple(n[ok] for n in nb)]
        keep = j >= 0
        a_list.append(np.flatnonzero(keep))
        b_list.append(j[keep])
    a = np.concatenate(a_list)
    b = np.concatenate(b_list)
    parent = np.arange(flat.size)
    while True:
        pa, pb = parent[a], parent[b]
        low = np.minimum(pa, pb)
        new = parent.copy()
        np.minimum.at(new, pa, low)
        np.minimum.at(new, pb, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, parent):
            break
        parent = new
    _, labels = np.unique(parent, return_inverse=True)
    out.reshape(-1)[flat] = labels.astype(np.int32) + 1
    return out, int(labels.max()) + 1


def remove_small_components(mask: npt.ArrayLike, min_voxels: float) -> BoolArray:
    """Drop components with fewer than ``min_voxels`` voxels (the runtime's clean-up)."""
    m = np.asarray(mask, bool)
    if min_voxels <= 1:
        return m.copy()
    labels, n = label_components(m)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def equivalent_radius_mm(voxels: int, voxel_volume_mm3: float) -> float:
    """Radius of the sphere with the volume of ``voxels`` voxels."""
    return float((3.0 * voxels * voxel_volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0))


@dataclass(frozen=True)
class LesionMatch:
    """One ground-truth lesion and how the prediction found it."""

    voxels: int
    radius_mm: float  # radius of the sphere with the lesion's volume
    detected: bool
    dice: float
    #: voxels of the predicted components that overlap the lesion (0 when missed)
    predicted_voxels: int = 0

    @property
    def volume_error(self) -> float:
        """Predicted over true volume, minus 1 (-1.0 when missed)."""
        return self.predicted_voxels / self.voxels - 1.0


def match_lesions(
    pred: npt.ArrayLike, truth: npt.ArrayLike, voxel_volume_mm3: float
) -> tuple[list[LesionMatch], int, int]:
    """Lesion-level matching: (matches per true lesion, predicted components, false positives)."""
    matches, n_pred, fp_radii = match_components(pred, truth, voxel_volume_mm3)
    return matches, n_pred, len(fp_radii)


def match_components(
    pred: npt.ArrayLike, truth: npt.ArrayLike, voxel_volume_mm3: float
) -> tuple[list[LesionMatch], int, list[float]]:
    """(matches per true lesion, predicted components, equivalent radius of each false
    positive component in mm)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    t_labels, n_t = label_components(t)
    p_labels, n_p = label_components(p)
    p_sizes = np.bincount(p_labels.ravel(), minlength=n_p + 1)
    matches = []
    hit_pred: set[int] = set()
    for i in range(1, n_t + 1):
        lesion = t_labels == i
        touching = np.unique(p_labels[lesion])
        touching = touching[touching > 0]
        hit_pred.update(int(j) for j in touching)
        found = np.isin(p_labels, touching) if touching.size else np.zeros_like(lesion)
        voxels = int(lesion.sum())
        matches.append(
            LesionMatch(
                voxels,
                equivalent_radius_mm(voxels, voxel_volume_mm3),
                bool(touching.size),
                dice(found, lesion),
                int(p_sizes[touching].sum()),
            )
        )
    fp_radii = [
        equivalent_radius_mm(int(p_sizes[j]), voxel_volume_mm3)
        for j in range(1, n_p + 1)
        if j not in hit_pred
    ]
    return matches, n_p, fp_radii


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None or precision + recall == 0:
        return None
    return 2 * precision * recall / (precision + recall)


def summarise_bucket(matches: list[LesionMatch], false_positives: int) -> dict[str, Any]:
    """Lesion-level figures of one radius bucket: sensitivity, precision (detected lesions
    against those plus the false-positive components of the bucket's size), F1, lesion Dice
    and volume error (predicted / true volume - 1; a missed lesion counts -1)."""
    detected = sum(m.detected for m in matches)
    dices = [m.dice for m in matches]
    errors = [m.volume_error for m in matches]
    sensitivity = _ratio(detected, len(matches))
    precision = _ratio(detected, detected + false_positives)
    return {
        "lesions": len(matches),
        "detected": detected,
        "false_positive_components": false_positives,
        "sensitivity": sensitivity,
        "precision": precision,
        "f1": _f1(precision, sensitivity),
        "dice_mean": float(np.mean(dices)) if dices else None,
        "dice_median": float(np.median(dices)) if dices else None,
        "dice_min": float(np.min(dices)) if dices else None,
        "volume_error_mean": float(np.mean(errors)) if errors else None,
        "volume_error_min": float(np.min(errors)) if errors else None,
        "volume_error_max": float(np.max(errors)) if errors else None,
        "volume_error_abs_max": float(np.max(np.abs(errors))) if errors else None,
    }


def summarise_lesions(
    matches: list[LesionMatch],
    n_pred: int,
    n_fp: int,
    false_positive_radii: list[float] | None = None,
) -> dict[str, Any]:
    """Sensitivity, precision, F1, lesion Dice and volume error, overall and per radius
    bucket (:data:`RADIUS_BUCKETS` and :data:`RADIUS_GROUPS`).  Without
    ``false_positive_radii`` every false positive counts in every bucket."""
    sensitivity = _ratio(sum(m.detected for m in matches), len(matches))
    precision = _ratio(n_pred - n_fp, n_pred)
    out: dict[str, Any] = {
        "lesions": len(matches),
        "predicted_components": n_pred,
        "false_positive_components": n_fp,
        "lesion_sensitivity": sensitivity,
        "lesion_precision": precision,
        "lesion_f1": _f1(precision, sensitivity),
    }
    buckets: dict[str, Any] = {}
    for name, lo, hi in (*RADIUS_BUCKETS, *RADIUS_GROUPS):
        sel = [m for m in matches if lo <= m.radius_mm < hi]
        fps = (
            n_fp
            if false_positive_radii is None
            else sum(lo <= r < hi for r in false_positive_radii)
        )
        buckets[name] = summarise_bucket(sel, fps)
    out["by_radius"] = buckets
    return out


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def roc_curve(
    labels: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(false positive rate, true positive rate, thresholds), thresholds decreasing."""
    y = np.asarray(labels, bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.flatnonzero(np.diff(s)) if s.size else np.array([], int)
    ends = np.r_[distinct, y.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(y)[ends] if s.size else np.array([])
    fps = (ends + 1) - tps
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.r_[0.0, np.zeros(len(tps))]
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.r_[0.0, np.zeros(len(fps))]
    thresholds = np.r_[np.inf, s[ends]] if s.size else np.array([np.inf])
    return fpr, tpr, thresholds


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Area under the ROC curve (probability a positive outranks a negative, ties 1/2)."""
    y = np.asarray(labels, bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, np.float64)
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # average 1-based rank of a tie group
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(
    labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float
) -> dict[str, Any]:
    """Threshold metrics, confusion matrix [[TN, FP], [FN, TP]] and ROC-AUC."""
    y = np.asarray(labels, bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    p = s >= threshold
    tp = int(np.sum(p & y))
    tn = int(np.sum(~p & ~y))
    fp = int(np.sum(p & ~y))
    fn = int(np.sum(~p & y))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _f1(precision, recall)
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, y.size),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
        "roc_auc": roc_auc(y, s),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }
