"""PNG plots for evaluation reports (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.models.metrics import RADIUS_BUCKETS, roc_curve


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(labels: npt.ArrayLike, scores: npt.ArrayLike, auc: float | None, path: Path) -> None:
    """ROC curve with its AUC in the legend."""
    plt = _pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC = {auc:.4f})" if auc is not None else "ROC")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(
        xlabel="False positive rate",
        ylabel="True positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title="Slice-level ROC",
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(matrix: Sequence[Sequence[int]], path: Path) -> None:
    """2x2 confusion matrix [[TN, FP], [FN, TP]] as an annotated heat map."""
    plt = _pyplot()
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4, 3.6), dpi=100)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black"
        )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["absent", "present"],
        yticklabels=["absent", "present"],
        xlabel="Predicted",
        ylabel="Truth",
        title="Confusion matrix",
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overlays(examples: Sequence[tuple[Any, npt.NDArray[np.bool_]]], path: Path) -> None:
    """For each (case, prediction): the slice with most lesion, truth and prediction contours."""
    plt = _pyplot()
    n = max(1, len(examples))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), dpi=100, squeeze=False)
    for ax, (case, pred) in zip(axes[0], examples, strict=False):
        k = int(np.argmax(case.mask[..., 0].sum(axis=(1, 2))))
        ax.imshow(np.clip(case.hu[k], -1000, 400), cmap="gray")
        ax.contour(case.mask[k, ..., 0], levels=[0.5], colors="lime", linewidths=0.8)
        if pred[k, ..., 0].any():
            ax.contour(pred[k, ..., 0], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{case.case_id} slice {k}", fontsize=8)
        ax.axis("off")
    for ax in axes[0][len(examples) :]:
        ax.axis("off")
    fig.suptitle("truth (green) vs prediction (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_dice_by_radius(summary: dict[str, Any], path: Path) -> None:
    """Mean lesion Dice and sensitivity per equivalent-radius bucket."""
    plt = _pyplot()
    label = next(iter(summary["labels"].values()))
    disjoint = {name for name, _, _ in RADIUS_BUCKETS}
    buckets = {k: v for k, v in label["by_radius"].items() if k in disjoint}
    names = list(buckets)
    dice = [buckets[k]["dice_mean"] or 0.0 for k in names]
    sens = [buckets[k]["sensitivity"] or 0.0 for k in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.bar(x - 0.2, dice, 0.4, label="lesion Dice")
    ax.bar(x + 0.2, sens, 0.4, label="sensitivity")
    ax.set(
        xticks=x,
        xticklabels=[f"{k}\n(n={buckets[k]['lesions']})" for k in names],
        ylim=(0, 1.05),
        title="Lesion-level results by radius",
    )
    ax.axhline(0.9, ls="--", color="grey", lw=1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
