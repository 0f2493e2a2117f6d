"""Keras 3 architectures (channels-last, dynamic spatial dimensions).

Both networks are fully convolutional up to their heads, so one exported ONNX graph serves
any in-plane size that is a multiple of ``2 ** depth`` (the shared preprocessing pads to
the card's ``pad_multiple``).  Kept deliberately small: the node must segment a 300-slice
CT on two CPU cores in a few seconds.

Import this module only where TensorFlow is available (the ``train`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
from keras import layers

INPUT_NAME = "image"
SEGMENTATION_OUTPUT = "probabilities"
CLASSIFICATION_OUTPUT = "probabilities"


def _conv_block(x: Any, filters: int, name: str, batch_norm: bool) -> Any:
    """Two 3x3 convolutions, each followed by (optional) batch norm and ReLU."""
    for i in (1, 2):
        x = layers.Conv2D(
            filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv{i}"
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(
    *,
    channels: int = 1,
    classes: int = 1,
    base_filters: int = 8,
    depth: int = 3,
    max_filters: int = 64,
    batch_norm: bool = True,
    name: str = "unet2d",
) -> keras.Model:
    """A 2D U-Net with a sigmoid head: (N, H, W, channels) -> (N, H, W, classes).

    Parameters
    ----------
    channels
        Input channels (1 for single slices, ``2k+1`` for 2.5D stacks).
    classes
        Output channels, one independent sigmoid per label.
    base_filters, depth, max_filters
        Filters double per level from ``base_filters`` (capped at ``max_filters``);
        ``depth`` max-pooling steps, so H and W must be multiples of ``2 ** depth``.
    """
    inputs = keras.Input(shape=(None, None, channels), name=INPUT_NAME)
    x = inputs
    skips = []
    for level in range(depth):
        x = _conv_block(x, min(base_filters * 2**level, max_filters), f"enc{level}", batch_norm)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_block(x, min(base_filters * 2**depth, max_filters), "bottleneck", batch_norm)
    for level in reversed(range(depth)):
        filters = min(base_filters * 2**level, max_filters)
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level}", batch_norm)
    outputs = layers.Conv2D(classes, 1, activation="sigmoid", name=SEGMENTATION_OUTPUT)(x)
    return keras.Model(inputs, outputs, name=name)


def build_classifier(
    *,
    channels: int = 1,
    classes: int = 1,
    base_filters: int = 8,
    depth: int = 4,
    max_filters: int = 64,
    batch_norm: bool = True,
    dropout: float = 0.0,
    name: str = "slice_classifier",
) -> keras.Model:
    """A small CNN slice classifier: (N, H, W, channels) -> (N, classes) sigmoid.

    ``depth`` blocks of conv + stride-2 pooling, then global max *and* average pooling so
    a small focal finding anywhere in the slice is not averaged away, then a dense head.
    """
    inputs = keras.Input(shape=(None, None, channels), name=INPUT_NAME)
    x = inputs
    for level in range(depth):
        filters = min(base_filters * 2**level, max_filters)
        x = _conv_block(x, filters, f"block{level}", batch_norm)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    pooled_max = layers.GlobalMaxPooling2D(name="global_max")(x)
    pooled_avg = layers.GlobalAveragePooling2D(name="global_avg")(x)
    x = layers.Concatenate(name="pooled")([pooled_max, pooled_avg])
    if dropout > 0:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(classes, activation="sigmoid", name=CLASSIFICATION_OUTPUT)(x)
    return keras.Model(inputs, outputs, name=name)


ARCHITECTURES: Mapping[str, Callable[..., keras.Model]] = {
    "unet2d": build_unet,
    "slice_classifier": build_classifier,
}


def build_model(architecture: str, **params: Any) -> keras.Model:
    """Build a registered architecture by name (the recipe's ``[model] architecture``)."""
    try:
        factory = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {architecture!r}; known: {known}") from None
    return factory(**params)
