"""The lesion pipeline: segmentation bundle (+ optional classifier) -> masks and findings.

Findings are the connected components (26-connectivity) of each thresholded label, measured
on the source grid in patient millimetres: volume, longest diameter (largest distance
between voxel centres of the component's surface), mean HU and centroid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.uid import generate_uid
from scipy import ndimage

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label
from dicomnode.inference.preprocess import prepare_slices
from dicomnode.inference.runner import BundleRunner
from dicomnode.pipelines.results import (
    AlgorithmInfo,
    Classification,
    Finding,
    PipelineResult,
    SegmentResult,
)

log = logging.getLogger(__name__)

_MAX_DIAMETER_POINTS = 3000
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")


def longest_diameter_mm(points_mm: npt.NDArray[np.float64]) -> float:
    """Largest pairwise distance between points (N, 3), chunked to bound memory."""
    n = len(points_mm)
    if n < 2:
        return 0.0
    if n > _MAX_DIAMETER_POINTS:
        idx = np.linspace(0, n - 1, _MAX_DIAMETER_POINTS).astype(np.intp)
        points_mm = points_mm[idx]
    best = 0.0
    for start in range(0, len(points_mm), 512):
        block = points_mm[start : start + 512]
        d2 = ((block[:, None, :] - points_mm[None, :, :]) ** 2).sum(axis=-1)
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
) -> tuple[npt.NDArray[np.bool_], list[Finding]]:
    """Drop components below ``min_volume_mm3`` and measure the rest (largest first)."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return mask, []
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    voxel_mm3 = volume.voxel_volume_mm3
    keep = [i for i in range(1, count + 1) if sizes[i] * voxel_mm3 >= min_volume_mm3]
    keep.sort(key=lambda i: -sizes[i])
    cleaned = np.isin(labelled, keep)
    slices = ndimage.find_objects(labelled)
    findings = []
    for n, comp in enumerate(keep, start=1):
        box = slices[comp - 1]
        assert box is not None
        local = labelled[box] == comp
        offset = np.array([s.start for s in box])
        surface = local & ~ndimage.binary_erosion(local)
        pts = volume.voxel_to_patient(np.argwhere(surface) + offset)
        all_idx = np.argwhere(local) + offset
        hu = volume.pixels[box][local]
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
            )
        )
    return cleaned, findings


@dataclass
class LesionPipeline:
    """Runs the segmentation bundle (and the classifier, if any) on one volume."""

    segmentation: BundleRunner
    classification: BundleRunner | None = None

    @property
    def algorithm(self) -> AlgorithmInfo:
        card = self.segmentation.card
        return AlgorithmInfo(card.name, card.version, card.manufacturer, ALGORITHM_FAMILY)

    def run(self, volume: Volume, uid_seed: str) -> PipelineResult:
        card = self.segmentation.card
        prepared = prepare_slices(volume.pixels, volume.pixel_spacing, card.preprocessing)
        probs = self.segmentation.predict_slices(volume.pixels, volume.pixel_spacing, prepared)
        segments, findings = [], []
        for number, label in enumerate(card.labels, start=1):
            raw = probs[label.index] >= label.threshold
            mask, found = measure_components(
                volume,
                raw,
                label,
                number,
                min_volume_mm3=card.min_component_volume_mm3,
                uid_seed=uid_seed,
            )
            segments.append(SegmentResult(number, label, mask))
            findings.extend(found)
        classifications = []
        if self.classification is not None:
            same = self.classification.card.preprocessing == card.preprocessing
            per_slice = self.classification.predict_slices(
                volume.pixels, volume.pixel_spacing, prepared if same else None
            )
            for label in self.classification.card.labels:
                column = per_slice[:, label.index]
                p = float(column.max() if label.aggregation == "max" else column.mean())
                classifications.append(Classification(label, p, p >= label.threshold))
        log.info(
            "pipeline %s: %d finding(s) on %d slices", card.name, len(findings), volume.shape[0]
        )
        return PipelineResult(
            volume=volume,
            segments=tuple(segments),
            findings=tuple(findings),
            classifications=tuple(classifications),
            algorithm=self.algorithm,
        )
