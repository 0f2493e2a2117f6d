"""Segmentation losses beyond Keras' own (TensorFlow/Keras only; imported by training).

``lesion_weighted_bce``: binary cross-entropy whose pixels near a lesion weigh
:data:`LESION_WEIGHT` times more than the rest, both terms alike.  Weighting the positive
term alone (class weighting) would move the output's 0.5 level off the edge; weighting the
neighbourhood keeps the loss minimal at ``p = target`` for every pixel, so with soft labels
(partial coverage) the prediction stays a coverage and its 0.5 level lies on the edge,
while lesions -- small ones most, their neighbourhood being large against their area --
are no longer a fraction of a percent of the loss.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

#: Weight of a pixel within :data:`NEIGHBOURHOOD_PX` // 2 pixels of a lesion (else 1).
LESION_WEIGHT = 10.0
#: Side of the square neighbourhood (model pixels) that counts as near a lesion.
NEIGHBOURHOOD_PX = 9


def _register(fn: Any) -> Any:
    return keras.saving.register_keras_serializable(package="dicomnode")(fn)


@_register
def lesion_weighted_bce(y_true: Any, y_pred: Any) -> Any:
    """Weighted mean of the pixels' binary cross-entropy (NHWC, targets in 0..1)."""
    near = ops.max_pool(y_true, pool_size=NEIGHBOURHOOD_PX, strides=1, padding="same")
    weight = 1.0 + (LESION_WEIGHT - 1.0) * ops.cast(near > 0.0, "float32")
    p = ops.clip(y_pred, 1e-7, 1.0 - 1e-7)
    bce = -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
    return ops.sum(weight * bce) / ops.sum(weight)
