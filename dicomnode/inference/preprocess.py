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

#: Slices windowed and resampled at once by :func:`prepare_slices`.
PREPARE_SLICES = 4

#: Hounsfield units above which a pixel is the patient (or the table), not air (-1000).
BODY_HU = -500.0


@dataclass(frozen=True)
class SliceGeometry:
    """What :func:`restore_slices` needs to map model output back to the source grid."""

    source_shape: tuple[int, int]
    resampled_shape: tuple[int, int]
    padded_shape: tuple[int, int]


def apply_intensity(hu: npt.ArrayLike, spec: Preprocessing) -> FloatArray:
    """Clip to the HU window and normalise (``minmax`` -> [0, 1], ``zscore`` -> mean/std).

    One float32 copy of ``hu``, worked on in place (the same float32 operations, so the
    same values, as with a new array per step)."""
    x = np.array(hu, dtype=np.float32)
    np.clip(x, spec.window_min, spec.window_max, out=x)
    if spec.normalisation == "minmax":
        x -= spec.window_min
        x /= spec.window_max - spec.window_min
    else:
        x -= spec.mean
        x /= spec.std
    return x


def _taps(n_in: int, n_out: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], FloatArray]:
    """Source indices and weights of 1D linear interpolation with half-pixel centres."""
    pos = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize_bilinear(batch: npt.ArrayLike, shape: tuple[int, int]) -> FloatArray:
    """Resize (N, H, W) to (N, *shape) with bilinear interpolation (half-pixel centres).

    Separable: one two-tap pass along rows, one along columns, a slice at a time in
    buffers reused from slice to slice (``a + (b - a) * w``, computed in place)."""
    src = np.asarray(batch, dtype=np.float32)
    n, h, w = src.shape
    oh, ow = shape
    if (oh, ow) == (h, w):
        return src.copy()
    y0, y1, wy = _taps(h, oh)
    x0, x1, wx = _taps(w, ow)
    wy_col = wy[:, None]
    out = np.empty((n, oh, ow), dtype=np.float32)
    top, rows, left = (np.empty(s, dtype=np.float32) for s in ((oh, w), (oh, w), (oh, ow)))
    for k in range(n):
        np.take(src[k], y0, axis=0, out=top)
        np.take(src[k], y1, axis=0, out=rows)
        rows -= top
        rows *= wy_col
        rows += top  # (oh, w)
        np.take(rows, x0, axis=1, out=left)
        np.take(rows, x1, axis=1, out=out[k])
        out[k] -= left
        out[k] *= wx
        out[k] += left
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
    """Turn (N, H, W) HU slices into the model's (N, h, w) input and the restore geometry.

    A few slices at a time (:data:`PREPARE_SLICES`), written into the result: the float
    copies at the source resolution stay small whatever N is."""
    arr = np.asarray(hu)  # int16 or float32: apply_intensity makes the float32 copy
    if arr.ndim != 3:
        raise ValueError(f"expected (slices, rows, columns), got shape {arr.shape}")
    src_shape = (int(arr.shape[1]), int(arr.shape[2]))
    rs = resampled_shape(src_shape, pixel_spacing, spec)
    m = spec.pad_multiple
    padded = (-(-rs[0] // m) * m, -(-rs[1] // m) * m)
    if padded != rs:
        fill = float(apply_intensity(np.float32(spec.window_min), spec))
        out = np.full((arr.shape[0], *padded), fill, dtype=np.float32)
    else:
        out = np.empty((arr.shape[0], *padded), dtype=np.float32)
    for start in range(0, arr.shape[0], PREPARE_SLICES):
        x = apply_intensity(arr[start : start + PREPARE_SLICES], spec)
        if rs != src_shape:
            x = resize_bilinear(x, rs)
        out[start : start + len(x), : rs[0], : rs[1]] = x
    return out, SliceGeometry(src_shape, rs, padded)


def body_box(
    x: npt.NDArray[np.float32], spec: Preprocessing, *, margin: int, multiple: int
) -> tuple[slice, slice] | None:
    """The rows and columns of prepared slices ``x`` (slices, h, w) that hold the body:
    the box around every pixel above :data:`BODY_HU` in any slice, ``margin`` pixels
    wider, its edges on multiples of ``multiple`` (so a network's pooling grid stays
    where it was).  An empty box (nothing but air) is ``(slice(0, 0), slice(0, 0))``;
    None where the card's window does not tell air from the body (it clips both to its
    lower end)."""
    if spec.window_min > BODY_HU:
        return None
    level = float(apply_intensity(np.float32(BODY_HU), spec))
    inside = np.any(x > level, axis=0)
    rows = np.flatnonzero(inside.any(axis=1))
    if len(rows) == 0:
        return slice(0, 0), slice(0, 0)
    cols = np.flatnonzero(inside.any(axis=0))
    h, w = inside.shape

    def edges(first: int, last: int, size: int) -> slice:
        start = max(0, (first - margin) // multiple * multiple)
        stop = min(size, -(-(last + 1 + margin) // multiple) * multiple)
        return slice(start, stop)

    return edges(int(rows[0]), int(rows[-1]), h), edges(int(cols[0]), int(cols[-1]), w)


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


def stack_context(slices: npt.ArrayLike, context: int) -> FloatArray:
    """(N, h, w) -> (N, context, h, w): each slice with its neighbours (2.5D input),
    edges repeated.  ``context`` is odd; 1 gives (N, 1, h, w)."""
    arr = np.asarray(slices, dtype=np.float32)
    half = context // 2
    n = arr.shape[0]
    idx = np.clip(np.arange(n)[:, None] + np.arange(-half, half + 1)[None, :], 0, n - 1)
    out: FloatArray = arr[idx]
    return out


def restore_slices(
    output: npt.ArrayLike, geometry: SliceGeometry, skip_below: float | None = None
) -> FloatArray:
    """Crop padding and resample model output (N, h, w) back to the source (N, H, W).

    With ``skip_below``, slices whose values all stay below it come back as zeros without
    being resampled: bilinear interpolation never exceeds its inputs, so a mask
    thresholded at ``>= skip_below`` is exactly the same, and most slices of a study have
    nothing to resample."""
    arr = np.asarray(output, dtype=np.float32)
    h, w = geometry.resampled_shape
    cropped = arr[:, :h, :w]
    if skip_below is None:
        return resize_bilinear(cropped, geometry.source_shape)
    out = np.zeros((arr.shape[0], *geometry.source_shape), dtype=np.float32)
    keep = np.flatnonzero(cropped.reshape(len(cropped), -1).max(axis=1) >= skip_below)
    for start in range(0, len(keep), PREPARE_SLICES):  # a few at a time, as prepare_slices
        some = keep[start : start + PREPARE_SLICES]
        out[some] = resize_bilinear(cropped[some], geometry.source_shape)
    return out
