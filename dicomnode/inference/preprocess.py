"""Slice preprocessing shared by training (``models/``) and the runtime.

One code path for both, so a model sees at inference exactly what it saw in training:
HU window -> normalisation -> in-plane resampling to the card's target spacing -> padding
to a multiple of the network's stride.  :func:`restore_slices` undoes the geometric part on
the model's output so results land voxel for voxel on the source grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.inference.card import Preprocessing

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SliceGeometry:
    """What :func:`restore_slices` needs to map model output back to the source grid."""

    source_shape: tuple[int, int]
    resampled_shape: tuple[int, int]
    padded_shape: tuple[int, int]


def apply_intensity(hu: npt.ArrayLike, spec: Preprocessing) -> FloatArray:
    """Clip to the HU window and normalise (``minmax`` -> [0, 1], ``zscore`` -> mean/std)."""
    x = np.clip(np.asarray(hu, dtype=np.float32), spec.window_min, spec.window_max)
    if spec.normalisation == "minmax":
        out = (x - spec.window_min) / (spec.window_max - spec.window_min)
    else:
        out = (x - spec.mean) / spec.std
    return out.astype(np.float32, copy=False)


def resize_bilinear(batch: npt.ArrayLike, shape: tuple[int, int]) -> FloatArray:
    """Resize (N, H, W) to (N, *shape) with bilinear interpolation (half-pixel centres)."""
    src = np.asarray(batch, dtype=np.float32)
    _, h, w = src.shape
    oh, ow = shape
    if (oh, ow) == (h, w):
        return src.copy()
    ys = np.clip((np.arange(oh, dtype=np.float32) + 0.5) * (h / oh) - 0.5, 0, h - 1)
    xs = np.clip((np.arange(ow, dtype=np.float32) + 0.5) * (w / ow) - 0.5, 0, w - 1)
    y0 = np.floor(ys).astype(np.intp)
    x0 = np.floor(xs).astype(np.intp)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[None, :, None]
    wx = (xs - x0)[None, None, :]
    top = src[:, y0][:, :, x0] * (1 - wx) + src[:, y0][:, :, x1] * wx
    bottom = src[:, y1][:, :, x0] * (1 - wx) + src[:, y1][:, :, x1] * wx
    out: FloatArray = (top * (1 - wy) + bottom * wy).astype(np.float32, copy=False)
    return out


def resampled_shape(
    shape: tuple[int, int], pixel_spacing: tuple[float, float], spec: Preprocessing
) -> tuple[int, int]:
    """In-plane shape after resampling to ``spec.target_spacing_mm`` (None keeps the grid)."""
    if spec.target_spacing_mm is None:
        return shape
    t = spec.target_spacing_mm
    return (
        max(1, round(shape[0] * pixel_spacing[0] / t)),
        max(1, round(shape[1] * pixel_spacing[1] / t)),
    )


def prepare_slices(
    hu: npt.ArrayLike, pixel_spacing: tuple[float, float], spec: Preprocessing
) -> tuple[FloatArray, SliceGeometry]:
    """Turn (N, H, W) HU slices into the model's (N, h, w) input and the restore geometry."""
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected (slices, rows, columns), got shape {arr.shape}")
    src_shape = (int(arr.shape[1]), int(arr.shape[2]))
    rs = resampled_shape(src_shape, pixel_spacing, spec)
    x = resize_bilinear(apply_intensity(arr, spec), rs)
    m = spec.pad_multiple
    padded = (-(-rs[0] // m) * m, -(-rs[1] // m) * m)
    if padded != rs:
        fill = float(apply_intensity(np.float32(spec.window_min), spec))
        out = np.full((x.shape[0], *padded), fill, dtype=np.float32)
        out[:, : rs[0], : rs[1]] = x
        x = out
    return x, SliceGeometry(src_shape, rs, padded)


def prepare_labels(
    mask: npt.ArrayLike, pixel_spacing: tuple[float, float], spec: Preprocessing
) -> FloatArray:
    """Resample a binary (N, H, W) mask exactly as :func:`prepare_slices` does the image."""
    arr = np.asarray(mask, dtype=np.float32)
    rs = resampled_shape((int(arr.shape[1]), int(arr.shape[2])), pixel_spacing, spec)
    y = (resize_bilinear(arr, rs) >= 0.5).astype(np.float32)
    m = spec.pad_multiple
    padded = (-(-rs[0] // m) * m, -(-rs[1] // m) * m)
    out = np.zeros((y.shape[0], *padded), dtype=np.float32)
    out[:, : rs[0], : rs[1]] = y
    return out


def restore_slices(output: npt.ArrayLike, geometry: SliceGeometry) -> FloatArray:
    """Crop padding and resample model output (N, h, w) back to the source (N, H, W)."""
    arr = np.asarray(output, dtype=np.float32)
    h, w = geometry.resampled_shape
    return resize_bilinear(arr[:, :h, :w], geometry.source_shape)
