"""Result types a pipeline hands to the output builders (our own types, no highdicom)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label

#: (123110, DCM, "Artificial Intelligence"): the algorithm family of every model here.
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identifies the model that produced a result (SEG algorithm identification, SR)."""

    name: str
    version: str
    manufacturer: str
    family: Code = ALGORITHM_FAMILY


@dataclass(frozen=True)
class SegmentResult:
    """One label's binary mask on the volume's grid (slices, rows, columns)."""

    segment_number: int
    label: Label
    mask: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Finding:
    """One connected component of a segment, measured on the source grid."""

    tracking_id: str
    tracking_uid: str
    segment_number: int
    label: Label
    volume_mm3: float
    longest_diameter_mm: float
    mean_hu: float
    centroid_mm: tuple[float, float, float]
    voxel_count: int
    slice_indices: tuple[int, ...]


@dataclass(frozen=True)
class Classification:
    """A study-level classification (e.g. 'lesion present') with its probability."""

    label: Label
    probability: float
    positive: bool


@dataclass(frozen=True)
class PipelineResult:
    volume: Volume
    segments: tuple[SegmentResult, ...]
    findings: tuple[Finding, ...]
    classifications: tuple[Classification, ...]
    algorithm: AlgorithmInfo
