"""The lesion pipeline: segmentation bundle (+ optional classifier) -> masks and findings.

Findings are the connected components (26-connectivity) of each thresholded label, measured
on the source grid in patient millimetres: volume, longest diameter (largest distance
between voxel centres of the component's surface), mean HU, centroid and key slice (the
slice where its cross-section is largest: the Key Object Selection points there).

With ``heat_maps`` (the pipeline setting), the segmentation model's probability map of
each label is kept, quantised to uint8, as the explanation of that label's findings and of
the classifier's result for the same finding: the node returns it as a Parametric Map.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from pydicom.uid import generate_uid
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Label
from dicomnode.inference.runner import BundleRunner
from dicomnode.inference.slabs import iter_slabs, slab_slices
from dicomnode.pipelines.base import BundleRole, Pipeline
from dicomnode.pipelines.classification import aggregate, algorithm_of
from dicomnode.pipelines.results import (
    HEAT_MAP_LEVELS,
    AlgorithmInfo,
    Finding,
    HeatMap,
    PipelineResult,
    SegmentResult,
)

log = logging.getLogger(__name__)

#: Up to this many distinct points the diameter is found by comparing all pairs.
_BRUTE_FORCE_POINTS = 256
#: Point pairs compared at once: bounds the temporary arrays to about 60 MB.
_PAIRS_PER_CHUNK = 1 << 21
#: Relative singular value below which a point set counts as flat (or as a line).
_FLAT_TOLERANCE = 1e-9


def longest_diameter_mm(points_mm: npt.NDArray[np.float64]) -> float:
    """Largest distance between any two of the points (N, 3), in the points' unit.

    Exact up to floating-point rounding.  The farthest pair of a point set lies on the
    vertices of its convex hull, so only those are compared, all pairs, in chunks.  Sets
    that are flat (a single-slice lesion) or on a line (a one-voxel-wide rod) have no 3-D
    hull; their hull is taken in their own plane or along their line.
    :func:`measure_components` passes the centres of a component's surface voxels.
    """
    points = np.unique(np.asarray(points_mm, dtype=np.float64).reshape(-1, 3), axis=0)
    if len(points) > _BRUTE_FORCE_POINTS:
        points = points[_hull_candidates(points)]
    return _largest_pairwise_distance(points)


def _hull_candidates(points: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """Indices of the hull vertices of distinct ``points``, in the span of the points."""
    centred = points - points.mean(axis=0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    rank = int(np.count_nonzero(singular > _FLAT_TOLERANCE * singular[0]))
    coords = centred @ axes[:rank].T  # coordinates in the points' own line/plane/space
    if rank < 2:
        return np.array([np.argmin(coords[:, 0]), np.argmax(coords[:, 0])], dtype=np.intp)
    try:
        hull = ConvexHull(coords)  # option Qc: points within rounding of a facet are kept too
    except QhullError:
        log.debug("no convex hull for %d points; comparing all pairs", len(points))
        return np.arange(len(points), dtype=np.intp)
    near = hull.coplanar[:, 0] if len(hull.coplanar) else np.empty(0, dtype=np.intp)
    return np.union1d(hull.vertices, near).astype(np.intp)


def _largest_pairwise_distance(points: npt.NDArray[np.float64]) -> float:
    best = 0.0
    rows = max(1, _PAIRS_PER_CHUNK // max(1, len(points)))
    for start in range(0, len(points), rows):
        block = points[start : start + rows]
        d2 = ((block[:, None, :] - points[None, start:, :]) ** 2).sum(axis=-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))


def measure_components(
    volume: Volume,
    mask: npt.NDArray[np.bool_],
    label: Label,
    segment_number: int,
    *,
    min_volume_mm3: float,
    uid_seed: str,
    algorithm: AlgorithmInfo | None = None,
) -> tuple[npt.NDArray[np.bool_], list[Finding]]:
    """Drop components below ``min_volume_mm3`` and measure the rest (largest first).

    ``algorithm`` (the model and parameters that made ``mask``) is set on each finding;
    None leaves it to the result's algorithm.
    """
    # Labelled within the box around the mask only: the same labels in the same (raster)
    # order as over the whole volume, without an int32 copy of all of it.
    around = ndimage.find_objects(mask.view(np.uint8))
    if not around or around[0] is None:
        return mask, []
    crop = around[0]
    labelled, count = ndimage.label(mask[crop], structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    voxel_mm3 = volume.voxel_volume_mm3
    keep = [i for i in range(1, count + 1) if sizes[i] * voxel_mm3 >= min_volume_mm3]
    keep.sort(key=lambda i: -sizes[i])
    cleaned = np.zeros(mask.shape, dtype=bool)  # calloc: untouched pages take no memory
    cleaned[crop] = np.isin(labelled, keep)
    slices = ndimage.find_objects(labelled)
    findings = []
    for n, comp in enumerate(keep, start=1):
        inner = slices[comp - 1]
        assert inner is not None
        local = labelled[inner] == comp
        box = tuple(
            slice(c.start + s.start, c.start + s.stop) for c, s in zip(crop, inner, strict=True)
        )
        offset = np.array([s.start for s in box])
        surface = local & ~ndimage.binary_erosion(local)
        pts = volume.voxel_to_patient(np.argwhere(surface) + offset)
        all_idx = np.argwhere(local) + offset
        hu = volume.pixels[box][local].astype(np.float32)  # float32 sums, int16 or not
        per_slice = local.reshape(len(local), -1).sum(axis=1)
        centroid = volume.voxel_to_patient(all_idx.mean(axis=0))
        findings.append(
            Finding(
                tracking_id=f"{label.name} {n}",
                tracking_uid=generate_uid(entropy_srcs=[uid_seed, label.name, str(n)]),
                segment_number=segment_number,
                label=label,
                volume_mm3=float(sizes[comp] * voxel_mm3),
                longest_diameter_mm=longest_diameter_mm(pts),
                mean_hu=float(hu.mean()),
                centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                voxel_count=int(sizes[comp]),
                slice_indices=tuple(sorted({int(k) for k in all_idx[:, 0]})),
                algorithm=algorithm,
                key_slice=int(offset[0] + np.argmax(per_slice)),
            )
        )
    return cleaned, findings


@dataclass
class LesionPipeline:
    """Runs the segmentation bundle (and the classifier, if any) on one volume."""

    segmentation: BundleRunner
    classification: BundleRunner | None = None
    #: Keep the probability map of each label as its explanation (:class:`HeatMap`).
    heat_maps: bool = False

    @property
    def algorithm(self) -> AlgorithmInfo:
        return algorithm_of(self.segmentation)

    def with_heat_maps(self) -> LesionPipeline:
        """The same pipeline, returning each label's probability map as a heat map."""
        return replace(self, heat_maps=True)

    def run(self, volume: Volume, uid_seed: str) -> PipelineResult:
        card = self.segmentation.card
        maps = (
            [np.zeros(volume.shape, dtype=np.uint8) for _ in card.labels] if self.heat_maps else []
        )
        masks, per_slice = self.infer(volume, maps)
        heat_maps = tuple(
            HeatMap(label, values, "segmentation probability", algorithm_of(self.segmentation))
            for label, values in zip(card.labels, maps, strict=False)
        )
        segments, findings = [], []
        for number, label in enumerate(card.labels, start=1):
            raw = masks.pop(0)
            algorithm = algorithm_of(self.segmentation, label)
            mask, found = measure_components(
                volume,
                raw,
                label,
                number,
                min_volume_mm3=card.min_component_volume_mm3,
                uid_seed=uid_seed,
                algorithm=algorithm,
            )
            del raw
            segments.append(SegmentResult(number, label, mask, algorithm))
            findings.extend(found)
        classifications = []
        if self.classification is not None and per_slice is not None:
            classifications = aggregate(self.classification, per_slice)
        log.info(
            "pipeline %s: %d finding(s) on %d slices", card.name, len(findings), volume.shape[0]
        )
        return PipelineResult(
            volume=volume,
            segments=tuple(segments),
            findings=tuple(findings),
            classifications=tuple(classifications),
            algorithm=self.algorithm,
            heat_maps=heat_maps,
        )

    def infer(
        self, volume: Volume, maps: list[npt.NDArray[np.uint8]] | None = None
    ) -> tuple[list[npt.NDArray[np.bool_]], npt.NDArray[np.float32] | None]:
        """The thresholded mask of each label (card order) and, with a classifier, its
        per-slice probabilities (slices, channels).  ``maps`` (one per label, of the
        volume's shape), when given, receive the quantised probabilities.

        The volume is streamed through both models in slabs
        (:mod:`dicomnode.inference.slabs`), prepared once when their preprocessing is the
        same; of the whole volume only the boolean masks are kept.
        """
        seg, cls = self.segmentation, self.classification
        card = seg.card
        shared = cls is not None and cls.card.preprocessing == card.preprocessing
        size = slab_slices(seg.batch_size, *([cls.batch_size] if cls is not None else []))
        context = card.input.context_slices
        if cls is not None and shared:
            context = max(context, cls.card.input.context_slices)
        slabs = iter_slabs(
            volume.pixels, volume.pixel_spacing, card.preprocessing, slices=size, context=context
        )
        others = None
        if cls is not None and not shared:
            others = iter_slabs(
                volume.pixels,
                volume.pixel_spacing,
                cls.card.preprocessing,
                slices=size,
                context=cls.card.input.context_slices,
            )
        masks = [np.zeros(volume.shape, dtype=bool) for _ in card.labels]
        per_slice = []
        for slab in slabs:
            probs = seg.segment_slab(slab)
            for mask, label in zip(masks, card.labels, strict=True):
                _threshold_into(mask, slab.start, probs[label.index], label.threshold)
            if maps:
                for values, label in zip(maps, card.labels, strict=True):
                    _quantise_into(values, slab.start, probs[label.index])
            del probs
            if cls is not None:
                per_slice.append(cls.classify_slab(slab if others is None else next(others)))
        return masks, np.concatenate(per_slice) if per_slice else None


def _threshold_into(
    mask: npt.NDArray[np.bool_], start: int, probs: npt.NDArray[np.float32], threshold: float
) -> None:
    """``mask[start:start + len(probs)] = probs >= threshold``, writing only the slices
    that have a voxel at or above it: the rest of the mask (made by ``np.zeros``) stays
    untouched pages that take no memory."""
    hit = probs >= threshold
    rows = np.flatnonzero(hit.reshape(len(hit), -1).any(axis=1))
    if len(rows):
        mask[start + rows] = hit[rows]


def _quantise_into(
    values: npt.NDArray[np.uint8], start: int, probs: npt.NDArray[np.float32]
) -> None:
    """``values[start:start + len(probs)]`` = the probabilities as 0..255, writing only
    the slices with a non-zero level (as :func:`_threshold_into`, the rest stays
    untouched pages)."""
    levels = np.rint(np.clip(probs, 0.0, 1.0) * HEAT_MAP_LEVELS).astype(np.uint8)
    rows = np.flatnonzero(levels.reshape(len(levels), -1).any(axis=1))
    if len(rows):
        values[start + rows] = levels[rows]


class LesionKind:
    """``kind = "lesion"``: ``bundles.segmentation`` (required), ``bundles.classification``
    (optional); a SEG with one segment per label and an SR with the findings."""

    roles: Mapping[str, BundleRole] = {
        "segmentation": BundleRole("segmentation"),
        "classification": BundleRole("classification", required=False),
    }
    emits_segmentation = True
    #: ``heat_maps = true`` is supported: the segmentation model's probability maps.
    explains = True

    def build(self, runners: Mapping[str, BundleRunner]) -> Pipeline:
        return LesionPipeline(runners["segmentation"], runners.get("classification"))


KIND = LesionKind()
