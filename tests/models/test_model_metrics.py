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


def test_volume_error_and_per_bucket_precision_f1() -> None:
    # Given a lesion of 27 voxels found with 9 too many, one of 8 voxels (r 4.96 mm) found
    # exactly, and two false positives: 1 voxel (r 2.48 mm) and 27 voxels (r 7.44 mm)
    truth = np.zeros((12, 20, 20), bool)
    truth[2:5, 2:5, 2:5] = True
    truth[8:10, 12:14, 12:14] = True
    pred = truth.copy()
    pred[5, 2:5, 2:5] = True  # +9 voxels on the big lesion
    pred[0, 18, 18] = True
    pred[7:10, 1:4, 16:19] = True
    # When they are matched and summarised
    matches, n_pred, fp_radii = m.match_components(pred, truth, voxel_volume_mm3=64.0)
    summary = m.summarise_lesions(matches, n_pred, len(fp_radii), fp_radii)
    # Then each lesion has its volume error and each false positive its own size bucket
    assert [x.predicted_voxels for x in matches] == [36, 8]
    assert [x.volume_error for x in matches] == pytest.approx([1 / 3, 0.0])
    radius = [(3 * n * 64 / (4 * math.pi)) ** (1 / 3) for n in (1, 27)]
    assert sorted(fp_radii) == pytest.approx(radius)
    b = summary["by_radius"]
    assert b["5_to_10mm"]["precision"] == 0.5 and b["5_to_10mm"]["f1"] == pytest.approx(2 / 3)
    assert b["5_to_10mm"]["volume_error_abs_max"] == pytest.approx(1 / 3)
    assert b["4_to_5mm"]["precision"] == 1.0 and b["4_to_5mm"]["volume_error_max"] == 0.0
    assert b["lt_3mm"]["lesions"] == 0 and b["lt_3mm"]["precision"] == 0.0
    assert b["lt_3mm"]["sensitivity"] is None and b["lt_3mm"]["f1"] is None
    assert b["3_to_5mm"]["lesions"] == b["lt_5mm"]["lesions"] == 1
    assert summary["lesion_precision"] == 0.5 and summary["lesion_f1"] == pytest.approx(2 / 3)


def test_a_missed_lesion_counts_minus_one_volume_error() -> None:
    truth = np.zeros((4, 8, 8), bool)
    truth[1:3, 1:3, 1:3] = True
    matches, _, _ = m.match_components(np.zeros_like(truth), truth, voxel_volume_mm3=1.0)
    assert matches[0].volume_error == -1.0
    bucket = m.summarise_bucket(matches, 0)
    assert bucket["sensitivity"] == 0.0 and bucket["volume_error_abs_max"] == 1.0
