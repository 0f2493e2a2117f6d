"""Evaluate a model on labelled DICOM cases: JSON metrics and PNG plots.

The model runs the way the node runs it: ``prepare_slices`` -> model -> ``restore_slices``
-> threshold, on whole series, and metrics are computed on the source grid.  A model is
either a Keras checkpoint (``KerasPredictor``, needs TensorFlow) or a bundle
(``OnnxPredictor``, ONNX Runtime only), so shipped bundles are checked as shipped.

Segmentation: Dice and IoU per case; lesion-level sensitivity, precision, F1, Dice and
volume error per equivalent-radius bucket (see :mod:`dicomnode.models.metrics`); and, from
each slice's highest probability, the model as a slice detector (ROC, confusion matrix).
Classification: per-slice "label present" (slices whose labelled area is below
``min_area_mm2`` but not zero are ambiguous and left out) and per-study (any slice;
aggregation max) metrics with ROC-AUC.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.inference.card import Label, ModelCard, Preprocessing
from dicomnode.inference.preprocess import prepare_slices, restore_slices
from dicomnode.models import metrics as m
from dicomnode.models.data import Case, context_stack

log = logging.getLogger(__name__)

Predictor = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class EvalSpec:
    """What evaluation needs to know about a model, from its recipe or its card."""

    task: str
    preprocessing: Preprocessing
    context_slices: int
    labels: tuple[Label, ...]
    min_component_volume_mm3: float = 0.0
    min_area_mm2: float = 0.0
    batch_size: int = 8


class KerasPredictor:
    """NHWC in, NHWC (or NC) probabilities out, through a Keras model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(self.model(x, training=False).numpy(), dtype=np.float32)


class OnnxPredictor:
    """NHWC in, NHWC (or NC) probabilities out, through a bundle on ONNX Runtime (CPU)."""

    def __init__(self, model_path: Path, card: ModelCard, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.card = card

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.card.input.layout == "NCHW":
            x = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
        (y,) = self.session.run([self.card.output.name], {self.card.input.name: x})
        if self.card.output.layout == "NCHW":
            y = np.transpose(y, (0, 2, 3, 1))
        return np.asarray(y, dtype=np.float32)


def predict_case(predictor: Predictor, case: Case, spec: EvalSpec) -> npt.NDArray[np.float32]:
    """Probabilities of a case: (slices, rows, columns, labels) or (slices, labels)."""
    x, geometry = prepare_slices(case.hu, case.pixel_spacing, spec.preprocessing)
    stack = context_stack(x, spec.context_slices)
    outputs = [
        predictor(stack[i : i + spec.batch_size]) for i in range(0, len(stack), spec.batch_size)
    ]
    y = np.concatenate(outputs, axis=0)
    if spec.task == "classification":
        return y
    return np.stack([restore_slices(y[..., c], geometry) for c in range(y.shape[-1])], axis=-1)


def evaluate_segmentation(
    predictor: Predictor, cases: Sequence[Case], spec: EvalSpec
) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[Case, Any]], dict[str, Any]]:
    """(summary, per-case rows, (case, prediction) pairs for the overlay plot, slice
    labels and scores per label for the ROC plot)."""
    rows: list[dict[str, Any]] = []
    examples: list[tuple[Case, Any]] = []
    per_label: dict[str, list[m.LesionMatch]] = {lb.name: [] for lb in spec.labels}
    fp_radii: dict[str, list[float]] = {lb.name: [] for lb in spec.labels}
    n_predicted = {lb.name: 0 for lb in spec.labels}
    slices: dict[str, tuple[list[Any], list[Any]]] = {lb.name: ([], []) for lb in spec.labels}
    for case in cases:
        prob = predict_case(predictor, case, spec)
        min_voxels = spec.min_component_volume_mm3 / case.voxel_volume_mm3
        area = case.slice_areas_mm2()
        row: dict[str, Any] = {"case": case.case_id}
        pred_all = np.zeros(prob.shape, bool)
        for c, label in enumerate(spec.labels):
            pred = m.remove_small_components(prob[..., c] >= label.threshold, min_voxels)
            pred_all[..., c] = pred
            truth = case.mask[..., c]
            matches, n_pred, fps = m.match_components(pred, truth, case.voxel_volume_mm3)
            per_label[label.name].extend(matches)
            n_predicted[label.name] += n_pred
            fp_radii[label.name].extend(fps)
            keep = ~((area[:, c] > 0) & (area[:, c] < spec.min_area_mm2))
            slices[label.name][0].append(area[keep, c] > 0)
            slices[label.name][1].append(prob[keep, ..., c].max(axis=(1, 2)))
            row[label.name] = {
                "dice": m.dice(pred, truth),
                "iou": m.iou(pred, truth),
                "lesions": len(matches),
                "detected": sum(x.detected for x in matches),
                "false_positive_components": len(fps),
                "lesion_radius_mm": [round(x.radius_mm, 2) for x in matches],
                "lesion_dice": [round(x.dice, 4) for x in matches],
                "lesion_volume_error": [round(x.volume_error, 4) for x in matches],
            }
        rows.append(row)
        if len(examples) < 4 and case.mask.any():
            examples.append((case, pred_all))
    summary: dict[str, Any] = {"cases": len(cases), "labels": {}}
    raw: dict[str, Any] = {}
    for label in spec.labels:
        dices = [r[label.name]["dice"] for r in rows]
        ious = [r[label.name]["iou"] for r in rows]
        fps = fp_radii[label.name]
        lesion = m.summarise_lesions(per_label[label.name], n_predicted[label.name], len(fps), fps)
        y, s = (np.concatenate(v) for v in slices[label.name])
        summary["labels"][label.name] = {
            "case_dice_mean": float(np.mean(dices)),
            "case_dice_median": float(np.median(dices)),
            "case_iou_mean": float(np.mean(ious)),
            **lesion,
            # "label present" per slice from the highest probability of the slice: the
            # ROC and confusion matrix of the model as a slice detector
            "slice": m.classification_metrics(y, s, label.threshold),
        }
        raw[label.name] = (y, s)
    first = summary["labels"][spec.labels[0].name]
    small = first["by_radius"]["3_to_5mm"]
    summary["headline"] = {
        "lesion_dice_radius_ge_5mm": first["by_radius"]["ge_5mm"]["dice_mean"],
        "lesion_sensitivity_radius_ge_5mm": first["by_radius"]["ge_5mm"]["sensitivity"],
        "lesion_dice_min_radius_3_to_5mm": small["dice_min"],
        "lesion_volume_error_abs_max_radius_3_to_5mm": small["volume_error_abs_max"],
        "lesion_sensitivity_radius_3_to_5mm": small["sensitivity"],
        "case_dice_mean": first["case_dice_mean"],
        "lesion_precision": first["lesion_precision"],
    }
    return summary, rows, examples, raw


def sweep_thresholds(
    predictor: Predictor, cases: Sequence[Case], spec: EvalSpec, thresholds: Sequence[float]
) -> dict[float, dict[str, Any]]:
    """Lesion-level figures (:func:`dicomnode.models.metrics.summarise_lesions`) of the first
    label at each threshold, the model run once per case: for choosing a segmentation
    threshold on tuning cases (never on the held-out ones)."""
    found: dict[float, list[m.LesionMatch]] = {t: [] for t in thresholds}
    n_pred = dict.fromkeys(thresholds, 0)
    fp_radii: dict[float, list[float]] = {t: [] for t in thresholds}
    for case in cases:
        prob = predict_case(predictor, case, spec)[..., 0]
        min_voxels = spec.min_component_volume_mm3 / case.voxel_volume_mm3
        for t in thresholds:
            pred = m.remove_small_components(prob >= t, min_voxels)
            matches, n, fps = m.match_components(pred, case.mask[..., 0], case.voxel_volume_mm3)
            found[t].extend(matches)
            n_pred[t] += n
            fp_radii[t].extend(fps)
    return {
        t: m.summarise_lesions(found[t], n_pred[t], len(fp_radii[t]), fp_radii[t])
        for t in thresholds
    }


def evaluate_classification(
    predictor: Predictor, cases: Sequence[Case], spec: EvalSpec
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(summary, per-case rows, raw scores for the ROC plot)."""
    slice_y: list[list[Any]] = [[] for _ in spec.labels]
    slice_s: list[list[Any]] = [[] for _ in spec.labels]
    study_y: list[list[bool]] = [[] for _ in spec.labels]
    study_s: list[list[float]] = [[] for _ in spec.labels]
    rows = []
    for case in cases:
        prob = predict_case(predictor, case, spec)
        area = case.slice_areas_mm2()
        row: dict[str, Any] = {"case": case.case_id}
        for c, label in enumerate(spec.labels):
            keep = ~((area[:, c] > 0) & (area[:, c] < spec.min_area_mm2))
            slice_y[c].append(area[keep, c] > 0)
            slice_s[c].append(prob[keep, c])
            agg = np.max if label.aggregation == "max" else np.mean
            study_y[c].append(bool(case.mask[..., c].any()))
            study_s[c].append(float(agg(prob[:, c])))
            row[label.name] = {"study_probability": study_s[c][-1], "present": study_y[c][-1]}
        rows.append(row)
    summary: dict[str, Any] = {"cases": len(cases), "min_area_mm2": spec.min_area_mm2, "labels": {}}
    raw: dict[str, Any] = {}
    for c, label in enumerate(spec.labels):
        y, s = np.concatenate(slice_y[c]), np.concatenate(slice_s[c])
        summary["labels"][label.name] = {
            "slice": m.classification_metrics(y, s, label.threshold),
            "study": m.classification_metrics(study_y[c], study_s[c], label.threshold),
        }
        raw[label.name] = (y, s)
    first = summary["labels"][spec.labels[0].name]
    summary["headline"] = {
        "roc_auc": first["slice"]["roc_auc"],
        "accuracy": first["slice"]["accuracy"],
        "f1": first["slice"]["f1"],
        "study_roc_auc": first["study"]["roc_auc"],
    }
    return summary, rows, raw


def evaluate(
    predictor: Predictor, cases: Sequence[Case], spec: EvalSpec, out: Path | None
) -> dict[str, Any]:
    """Evaluate and (when ``out`` is given) write ``metrics.json`` and the PNG plots."""
    from dicomnode.models import plots

    if spec.task == "segmentation":
        summary, rows, examples, raw = evaluate_segmentation(predictor, cases, spec)
    else:
        summary, rows, raw = evaluate_classification(predictor, cases, spec)
    result = {"task": spec.task, "summary": summary, "cases": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        if spec.task == "segmentation":
            plots.plot_overlays(examples, out / "overlays.png")
            plots.plot_dice_by_radius(summary, out / "lesion_dice_by_radius.png")
        for name, (y, s) in raw.items():
            metrics = summary["labels"][name]["slice"]
            plots.plot_roc(y, s, metrics["roc_auc"], out / f"roc_{name}.png")
            plots.plot_confusion(metrics["confusion_matrix"], out / f"confusion_{name}.png")
        log.info("evaluation written to %s", out)
    return result
