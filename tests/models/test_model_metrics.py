"""Evaluation metrics on hand-made arrays with known answers (no TensorFlow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.models import metrics as m


def test_dice_and_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 voxels
    b[0, 2:4] = True
    b[1, 0:2] = True  # 4 voxels, 2 shared
    assert m.dice(a, b) == pytest.approx(0.5)
    assert m.iou(a, b) == pytest.approx(2 / 6)
    assert m.dice(np.zeros(3), np.zeros(3)) == 1.0
    assert m.iou(a, np.zeros_like(a)) == 0.0


def test_connected_components_3d_26_connectivity() -> None:
    mask = np.zeros((3, 6, 6), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # diagonal neighbours: one component
    mask[2, 4:6, 4:6] = True  # a second one
    mask[0, 5, 0] = True  # an isolated voxel: a third
    labels, n = m.label_components(mask)
    assert n == 3
    assert labels[0, 0, 0] == labels[1, 1, 1]
    assert len({labels[0, 0, 0], labels[2, 4, 4], labels[0, 5, 0]}) == 3
    assert (labels > 0).sum() == mask.sum()
    # a long snake needs many hooking rounds
    snake = np.zeros((40, 40), bool)
    snake[::2, :] = True
    snake[1::4, -1] = True
    snake[3::4, 0] = True
    assert m.label_components(snake)[1] == 1
    assert m.label_components(np.zeros((2, 2), bool))[1] == 0


def test_remove_small_components() -> None:
    mask = np.zeros((1, 10, 10), bool)
    mask[0, :3, :3] = True  # 9 voxels
    mask[0, 8, 8] = True  # 1 voxel
    kept = m.remove_small_components(mask, min_voxels=2)
    assert kept.sum() == 9 and not kept[0, 8, 8]


def test_lesion_matching_sensitivity_precision_and_radius() -> None:
    truth = np.zeros((10, 20, 20), bool)
    truth[2:5, 2:5, 2:5] = True  # 27 voxels, found exactly
    truth[6:8, 12:14, 12:14] = True  # 8 voxels, missed
    pred = np.zeros_like(truth)
    pred[2:5, 2:5, 2:5] = True
    pred[0, 18, 18] = True  # a false positive
    matches, n_pred, n_fp = m.match_lesions(pred, truth, voxel_volume_mm3=64.0)
    assert (n_pred, n_fp) == (2, 1)
    assert [x.detected for x in matches] == [True, False]
    assert [x.dice for x in matches] == [1.0, 0.0]
    assert matches[0].radius_mm == pytest.approx((3 * 27 * 64 / (4 * math.pi)) ** (1 / 3))
    summary = m.summarise_lesions(matches, n_pred, n_fp)
    assert summary["lesion_sensitivity"] == 0.5 and summary["lesion_precision"] == 0.5
    # 27 * 64 mm^3 -> r = 7.4 mm (found); 8 * 64 mm^3 -> r = 4.96 mm (missed)
    assert summary["by_radius"]["5_to_10mm"]["dice_mean"] == 1.0
    assert summary["by_radius"]["lt_5mm"]["sensitivity"] == 0.0
    assert summary["by_radius"]["ge_5mm"]["lesions"] == 1


def test_roc_auc_known_values() -> None:
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert m.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert m.roc_auc([1, 1], [0.2, 0.3]) is None
    fpr, tpr, thr = m.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.isinf(thr[0])


def test_classification_metrics_confusion_matrix() -> None:
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    s = [0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7]
    r = m.classification_metrics(y, s, threshold=0.5)
    assert r["confusion_matrix"] == [[3, 1], [1, 3]]  # [[TN, FP], [FN, TP]]
    assert r["accuracy"] == 0.75 and r["precision"] == 0.75 and r["recall"] == 0.75
    assert r["f1"] == pytest.approx(0.75) and r["specificity"] == 0.75
    assert r["roc_auc"] == pytest.approx(14 / 16)
