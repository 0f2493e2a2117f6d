"""Result types a pipeline hands to the output builders (our own types, no highdicom)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label

#: (123110, DCM, "Artificial Intelligence"): the algorithm family of every model here.
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identifies the model that produced a result (SEG algorithm identification, SR).

    ``parameters`` are the settings that turned the model's output into this result, e.g.
    ``("threshold=0.5",)``: the SR writes them as TID 4019 Algorithm Parameters.
    """

    name: str
    version: str
    manufacturer: str
    family: Code = ALGORITHM_FAMILY
    parameters: tuple[str, ...] = ()

    @property
    def model(self) -> AlgorithmInfo:
        """The model alone, without the parameters of one result."""
        return replace(self, parameters=())


@dataclass(frozen=True)
class SegmentResult:
    """One label's binary mask on the volume's grid (slices, rows, columns).

    ``algorithm`` is the model (and parameters) that produced the mask; None means the
    result's :attr:`PipelineResult.algorithm`.
    """

    segment_number: int
    label: Label
    mask: npt.NDArray[np.bool_]
    algorithm: AlgorithmInfo | None = None


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
    #: The model that found it; None: the result's :attr:`PipelineResult.algorithm`.
    algorithm: AlgorithmInfo | None = None
    #: The slice where the finding's cross-section is largest (its key image); None:
    #: unknown (a finding made by hand), the middle of ``slice_indices`` is taken.
    key_slice: int | None = None

    @property
    def key_slice_index(self) -> int:
        """The finding's key slice: :attr:`key_slice`, else the middle of its slices."""
        if self.key_slice is not None:
            return self.key_slice
        return self.slice_indices[len(self.slice_indices) // 2]


@dataclass(frozen=True)
class Classification:
    """A study-level classification (e.g. 'lesion present') with its probability."""

    label: Label
    probability: float
    positive: bool
    #: The classifier; None: the result's :attr:`PipelineResult.algorithm`.
    algorithm: AlgorithmInfo | None = None


#: Values of a :class:`HeatMap`: 0..:data:`HEAT_MAP_LEVELS` for 0..1.
HEAT_MAP_LEVELS = 255


@dataclass(frozen=True)
class HeatMap:
    """An explanation of a label's result, voxel by voxel on the volume's grid.

    ``values`` (slices, rows, columns) hold the model's output for ``label`` quantised to
    uint8: ``v / HEAT_MAP_LEVELS`` is the probability (a quarter of the memory of float32;
    a step of 0.004 is finer than any threshold a card sets).  ``method`` says what the
    values are (``"segmentation probability"``): the Parametric Map's LUT explanation.
    ``algorithm`` is the model that made them; None: the result's algorithm.
    """

    label: Label
    values: npt.NDArray[np.uint8]
    method: str
    algorithm: AlgorithmInfo | None = None


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline found in one volume.

    ``algorithm`` is the primary model (the segmentation model where there is one): the
    SEG's algorithm and the SR's device observer.  Each segment, finding and
    classification may name the model that produced it; :meth:`algorithm_of` resolves it.
    """

    volume: Volume
    segments: tuple[SegmentResult, ...]
    findings: tuple[Finding, ...]
    classifications: tuple[Classification, ...]
    algorithm: AlgorithmInfo
    #: Explanation maps (a pipeline with ``heat_maps = true``): one per explained label.
    heat_maps: tuple[HeatMap, ...] = ()

    def algorithm_of(
        self, item: SegmentResult | Finding | Classification | HeatMap
    ) -> AlgorithmInfo:
        """The model (with its parameters) that produced ``item``."""
        return self.algorithm if item.algorithm is None else item.algorithm

    @property
    def algorithms(self) -> tuple[AlgorithmInfo, ...]:
        """Every model that contributed, each once without parameters, the primary first."""
        items: tuple[SegmentResult | Finding | Classification, ...] = (
            *self.segments,
            *self.findings,
            *self.classifications,
        )
        models = [self.algorithm.model, *(self.algorithm_of(i).model for i in items)]
        return tuple(dict.fromkeys(models))
