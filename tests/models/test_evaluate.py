"""Evaluation without a trained model: a predictor that returns its input as probability."""

from __future__ import annotations

import numpy as np

from dicomnode.inference.card import Preprocessing
from dicomnode.models.data import Case
from dicomnode.models.evaluate import EvalSpec, evaluate, sweep_thresholds
from dicomnode.models.recipe import load_recipe

LABELS = load_recipe("lesion_seg").labels


def _case() -> Case:
    # A cube of 4^3 voxels (2 mm) at HU 1000 in 0 HU, and a fainter cube of 2^3 at 500 HU
    hu = np.zeros((10, 32, 32), np.float32)
    hu[2:6, 4:8, 4:8] = 1000.0
    hu[7:9, 20:22, 20:22] = 500.0
    mask = np.zeros((*hu.shape, 1), bool)
    mask[2:6, 4:8, 4:8, 0] = True
    mask[7:9, 20:22, 20:22, 0] = True
    return Case("cubes", hu, mask, (2.0, 2.0), 2.0)


SPEC = EvalSpec(
    task="segmentation",
    preprocessing=Preprocessing(window_min=0.0, window_max=1000.0, target_spacing_mm=None),
    context_slices=1,
    labels=LABELS,
)


def identity(x: np.ndarray) -> np.ndarray:
    return x


def test_threshold_sweep_reports_each_threshold() -> None:
    # The faint cube has probability 0.5: found at 0.4, lost at 0.6
    result = sweep_thresholds(identity, [_case()], SPEC, [0.4, 0.6])
    assert result[0.4]["lesion_sensitivity"] == 1.0
    assert result[0.4]["by_radius"]["lt_3mm"]["volume_error_abs_max"] == 0.0
    assert result[0.6]["by_radius"]["lt_3mm"]["sensitivity"] == 0.0
    assert result[0.6]["by_radius"]["4_to_5mm"]["dice_min"] == 1.0  # 512 mm^3: r 4.96 mm


def test_segmentation_evaluation_writes_roc_and_confusion(tmp_path: object) -> None:
    from pathlib import Path

    out = Path(str(tmp_path))
    result = evaluate(identity, [_case()], SPEC, out)
    label = result["summary"]["labels"]["lesion"]
    assert label["slice"]["confusion_matrix"] == [[4, 0], [0, 6]]
    assert result["cases"][0]["lesion"]["lesion_volume_error"] == [0.0, 0.0]
    assert result["summary"]["headline"]["lesion_sensitivity_radius_3_to_5mm"] == 1.0
    for name in ("metrics.json", "roc_lesion.png", "confusion_lesion.png"):
        assert (out / name).is_file()
