"""Training losses: the lesion-weighted BCE keeps soft targets calibrated."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from dicomnode.models.losses import lesion_weighted_bce


def _loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(lesion_weighted_bce(y, p))


def test_minimal_where_the_prediction_is_the_soft_target() -> None:
    # Given a lesion with a partial-coverage edge
    y = np.zeros((1, 24, 24, 1), np.float32)
    y[0, 8:12, 8:12] = 1.0
    y[0, 12, 8:12] = 0.3
    best = _loss(y, np.clip(y, 0.001, 0.999))
    # when the edge is predicted higher or lower than its coverage, the loss grows
    for delta in (-0.2, 0.2):
        p = y.copy()
        p[0, 12, 8:12] += delta
        assert _loss(y, np.clip(p, 0.001, 0.999)) > best


def test_errors_near_a_lesion_weigh_more_than_far_away() -> None:
    y = np.zeros((1, 48, 48, 1), np.float32)
    y[0, 10:13, 10:13] = 1.0
    base = np.clip(y, 0.01, 0.99)
    near, far = base.copy(), base.copy()
    near[0, 14, 14] = 0.6  # two pixels from the lesion
    far[0, 40, 40] = 0.6
    base_loss = _loss(y, base)
    assert _loss(y, near) - base_loss > 5 * (_loss(y, far) - base_loss) > 0
