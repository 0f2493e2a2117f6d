"""The classification pipeline: one classifier bundle -> study-level classifications.

No masks and no findings: the node writes a TID 1500 SR with one qualitative evaluation
and probability per label, and no SEG.  Per-slice probabilities are aggregated per label
as the card says (``max`` or ``mean`` over the slices).

With ``heat_maps`` (the pipeline setting) each label's classification is explained by
occlusion sensitivity (Zeiler and Fergus 2014), which needs only forward runs of the ONNX
model: on the :data:`EXPLAINED_SLICES` slices the classifier rates highest, a patch of
the prepared slice is covered (with the slice's median) at each point of a
:data:`OCCLUSION_GRID` x :data:`OCCLUSION_GRID` grid, and each pixel's value is the mean
drop of the label's probability over the patches that cover it (0 where covering it
changes nothing, and on every other slice).  It costs about ``EXPLAINED_SLICES *
OCCLUSION_GRID**2`` classifier runs per label (432: about 5 s for 256 x 256 slices on two
CPU cores).  A slice whose probability stays saturated with a patch covered (two lesions
on it) shows little; Grad-CAM would need the model's gradients, which ONNX Runtime does
not give.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Label
from dicomnode.inference.preprocess import SliceGeometry, prepare_slices, restore_slices
from dicomnode.inference.runner import BundleRunner
from dicomnode.inference.slabs import Slab, iter_slabs, slab_slices
from dicomnode.pipelines.base import BundleRole, Pipeline
from dicomnode.pipelines.results import (
    ALGORITHM_FAMILY,
    HEAT_MAP_LEVELS,
    AlgorithmInfo,
    Classification,
    HeatMap,
    PipelineResult,
)

log = logging.getLogger(__name__)


#: Occlusion sensitivity: slices explained per label, and patch positions per side.
EXPLAINED_SLICES = 3
OCCLUSION_GRID = 12
#: Occluded copies run through the model at once (bounds the memory: 36 prepared slices).
_OCCLUSION_CHUNK = 36


def classify_volume(runner: BundleRunner, volume: Volume) -> list[Classification]:
    """One classification per label of the runner's card, aggregated over the slices.

    The volume goes through the model in slabs (:mod:`dicomnode.inference.slabs`)."""
    return aggregate(runner, classify_slices(runner, volume))


def classify_slices(runner: BundleRunner, volume: Volume) -> npt.NDArray[np.float32]:
    """Per-slice probabilities (slices, channels), the volume in slabs."""
    card = runner.card
    slabs = iter_slabs(
        volume.pixels,
        volume.pixel_spacing,
        card.preprocessing,
        slices=slab_slices(runner.batch_size),
        context=card.input.context_slices,
    )
    return np.concatenate([runner.classify_slab(slab) for slab in slabs])


def occlusion_maps(
    runner: BundleRunner, volume: Volume, per_slice: npt.NDArray[np.float32]
) -> tuple[HeatMap, ...]:
    """One occlusion-sensitivity :class:`HeatMap` per label (see the module docstring)."""
    maps = []
    for label in runner.card.labels:
        values = np.zeros(volume.shape, dtype=np.uint8)
        scores = per_slice[:, label.index]
        for k in sorted(np.argsort(-scores, kind="stable")[:EXPLAINED_SLICES].tolist()):
            drop = occlusion_sensitivity(runner, volume, int(k), label.index)
            values[k] = np.rint(np.clip(drop, 0.0, 1.0) * HEAT_MAP_LEVELS).astype(np.uint8)
        maps.append(HeatMap(label, values, "occlusion sensitivity", algorithm_of(runner, label)))
    return tuple(maps)


def occlusion_sensitivity(
    runner: BundleRunner, volume: Volume, k: int, channel: int
) -> npt.NDArray[np.float32]:
    """Slice ``k``: per source pixel, the mean drop of output ``channel`` when a patch
    covering the pixel is hidden (rows, columns)."""
    card = runner.card
    half = card.input.context_slices // 2
    lo, hi = max(0, k - half), min(volume.shape[0], k + half + 1)
    x, geometry = prepare_slices(volume.pixels[lo:hi], volume.pixel_spacing, card.preprocessing)
    centre = k - lo
    base = float(runner.classify_slab(Slab(k, k + 1, centre, x, geometry))[0, channel])
    h, w = geometry.resampled_shape
    stride = (math.ceil(h / OCCLUSION_GRID), math.ceil(w / OCCLUSION_GRID))
    patch = (2 * stride[0], 2 * stride[1])
    fill = float(np.median(x[centre, :h, :w]))
    boxes = [(r, c) for r in range(0, h, stride[0]) for c in range(0, w, stride[1])]
    drops: list[float] = []
    for start in range(0, len(boxes), _OCCLUSION_CHUNK):
        chunk = boxes[start : start + _OCCLUSION_CHUNK]
        copies = np.repeat(x[np.newaxis], len(chunk), axis=0)  # (n, slices, h, w)
        for i, (r, c) in enumerate(chunk):
            copies[i, centre, r : r + patch[0], c : c + patch[1]] = fill
        drops.extend(base - p for p in _classify_centres(runner, copies, centre, geometry, channel))
    total = np.zeros(x.shape[1:], dtype=np.float32)
    count = np.zeros(x.shape[1:], dtype=np.float32)
    for (r, c), d in zip(boxes, drops, strict=True):
        total[r : r + patch[0], c : c + patch[1]] += d
        count[r : r + patch[0], c : c + patch[1]] += 1.0
    sensitivity = total / np.maximum(count, 1.0)
    restored: npt.NDArray[np.float32] = restore_slices(sensitivity[np.newaxis], geometry)[0]
    return restored


def _classify_centres(
    runner: BundleRunner,
    copies: npt.NDArray[np.float32],
    centre: int,
    geometry: SliceGeometry,
    channel: int,
) -> list[float]:
    """The probability of each copy's centre slice: one slab of all centres when the model
    sees one slice, one slab per copy (with its own neighbours) otherwise."""
    if copies.shape[1] == 1:
        slab = Slab(0, len(copies), 0, copies[:, 0], geometry)
        return [float(p) for p in runner.classify_slab(slab)[:, channel]]
    return [
        float(runner.classify_slab(Slab(0, 1, centre, c, geometry))[0, channel]) for c in copies
    ]


def aggregate(runner: BundleRunner, per_slice: npt.NDArray[np.float32]) -> list[Classification]:
    """One classification per label from per-slice probabilities (slices, channels), as
    the card says (``max`` or ``mean`` over the slices)."""
    out = []
    for label in runner.card.labels:
        column = per_slice[:, label.index]
        p = float(column.max() if label.aggregation == "max" else column.mean())
        out.append(Classification(label, p, p >= label.threshold, algorithm_of(runner, label)))
    return out


def algorithm_of(runner: BundleRunner, label: Label | None = None) -> AlgorithmInfo:
    """The runner's model; with ``label``, also the card's settings that turned the
    model's output for that label into a result (TID 4019 Algorithm Parameters)."""
    card = runner.card
    parameters: tuple[str, ...] = ()
    if label is not None:
        parameters = (f"threshold={label.threshold:g}",)
        if card.task == "segmentation":
            parameters += (f"min_component_volume_mm3={card.min_component_volume_mm3:g}",)
        else:
            parameters += (f"aggregation={label.aggregation}",)
    return AlgorithmInfo(card.name, card.version, card.manufacturer, ALGORITHM_FAMILY, parameters)


@dataclass
class ClassificationPipeline:
    classifier: BundleRunner
    #: Explain each label's result by occlusion sensitivity (:func:`occlusion_maps`).
    heat_maps: bool = False

    @property
    def algorithm(self) -> AlgorithmInfo:
        return algorithm_of(self.classifier)

    def with_heat_maps(self) -> ClassificationPipeline:
        return replace(self, heat_maps=True)

    def run(self, volume: Volume, uid_seed: str) -> PipelineResult:
        per_slice = classify_slices(self.classifier, volume)
        classifications = aggregate(self.classifier, per_slice)
        heat_maps = occlusion_maps(self.classifier, volume, per_slice) if self.heat_maps else ()
        log.info(
            "pipeline %s: %s on %d slices",
            self.classifier.card.name,
            ", ".join(f"{c.label.name} {c.probability:.3f}" for c in classifications),
            volume.shape[0],
        )
        return PipelineResult(
            volume=volume,
            segments=(),
            findings=(),
            classifications=tuple(classifications),
            algorithm=self.algorithm,
            heat_maps=heat_maps,
        )


class ClassificationKind:
    """``kind = "classification"``: ``bundles.classification`` only; an SR, no SEG."""

    roles: Mapping[str, BundleRole] = {"classification": BundleRole("classification")}
    emits_segmentation = False
    #: ``heat_maps = true``: occlusion sensitivity of the classifier.
    explains = True

    def build(self, runners: Mapping[str, BundleRunner]) -> Pipeline:
        return ClassificationPipeline(runners["classification"])


KIND = ClassificationKind()
