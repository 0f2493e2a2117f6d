"""A volume through preprocessing and the models in slabs of slices.

Preprocessing a whole volume at once holds several float copies of it (HU as float32,
windowed, resampled, padded, the model's output, that output on the source grid): 2.4 GB
at the peak for 300 x 512^2 slices (shared/PERF-NOTES.md).  Every step is slice-wise, and
a 2.5D model only needs a few neighbours of each slice, so a volume can go through in
slabs: each slab is prepared with a halo of ``context_slices // 2`` neighbours on each
side, run, and reduced by the caller (thresholded into masks, per-slice probabilities)
before the next one is prepared.  Only one slab's floats are alive at a time.

The results are those of the whole-volume path bit for bit: preprocessing is per slice,
the halo gives each slice the neighbours it would have had, and slabs are a whole number
of model batches, so every batch holds the slices it held before (ONNX Runtime's output
for a slice does not depend on its batch anyway: checked in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.inference.card import Preprocessing
from dicomnode.inference.preprocess import FloatArray, SliceGeometry, prepare_slices

#: Slices per slab, about: rounded up to a whole number of batches.  A slab's copies are
#: its prepared slices and the model's output on the model's grid (16 x 368 x 368 float32
#: each, 8 MiB, for a 512 x 512 slice of 0.7 mm and a 1.0 mm model) and the output restored
#: to the source grid (16 MiB); 32 slices raised the worker's peak by 55 MiB for the same
#: time (docs/performance.md).
SLAB_SLICES = 16


@dataclass(frozen=True)
class Slab:
    """Slices ``start:stop`` of a volume, prepared for a model.

    ``x`` holds the prepared slices ``start - before`` to ``stop + after`` (the halo: the
    neighbours the model's context needs, where the volume has them), shape
    (slices, h, w); ``geometry`` maps the model's output back to the source grid.
    """

    start: int
    stop: int
    before: int
    x: FloatArray
    geometry: SliceGeometry

    @property
    def own(self) -> tuple[int, int]:
        """The slab's own slices as ``(first, last)`` indices into ``x``."""
        return self.before, self.before + self.stop - self.start


def slab_slices(*batch_sizes: int, target: int = SLAB_SLICES) -> int:
    """Slices per slab: a multiple of every batch size, at least ``target`` (if given)."""
    step = math.lcm(*batch_sizes) if batch_sizes else 1
    return step * max(1, -(-target // step))


def iter_slabs(
    hu: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    pixel_spacing: tuple[float, float],
    spec: Preprocessing,
    *,
    slices: int,
    context: int = 1,
) -> Iterator[Slab]:
    """Slabs of ``slices`` slices of the (slices, rows, columns) volume ``hu``, prepared
    with ``spec`` (:func:`~dicomnode.inference.preprocess.prepare_slices`) and a halo of
    ``context // 2`` slices on each side."""
    if slices < 1:
        raise ValueError(f"slices must be positive, not {slices}")
    count = int(hu.shape[0])
    half = context // 2
    for start in range(0, count, slices):
        stop = min(count, start + slices)
        lo, hi = max(0, start - half), min(count, stop + half)
        x, geometry = prepare_slices(hu[lo:hi], pixel_spacing, spec)
        yield Slab(start, stop, start - lo, x, geometry)
