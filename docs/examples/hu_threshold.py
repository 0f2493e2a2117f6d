"""A pipeline kind without a model: bone, as the voxels above 300 HU, becomes one segment.

The worked example of docs/pipelines.md (run by tests/pipelines/test_registry.py).  It
shows the whole contract: a kind declares its bundle roles (none here), builds a
pipeline, and the pipeline turns a Volume into a PipelineResult of our own types; the
node writes the SEG and the TID 1500 SR and sends them like any other result.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label
from dicomnode.inference.runner import BundleRunner
from dicomnode.pipelines.base import BundleRole, Pipeline
from dicomnode.pipelines.lesion import measure_components
from dicomnode.pipelines.results import AlgorithmInfo, PipelineResult, SegmentResult

#: Cortical and trabecular bone; soft tissue and contrast-free vessels stay below.
LOW_HU, HIGH_HU = 300.0, 3000.0

LABEL = Label(
    index=0,
    name="bone",
    threshold=0.5,
    finding=Code("272673000", "SCT", "Bone structure"),
    segment_category=Code("91723000", "SCT", "Anatomical Structure"),
    segment_type=Code("272673000", "SCT", "Bone structure"),
)


class HuThresholdPipeline:
    @property
    def algorithm(self) -> AlgorithmInfo:
        return AlgorithmInfo("hu-threshold", "1.0.0", "Example Hospital")

    def run(self, volume: Volume, uid_seed: str) -> PipelineResult:
        inside = (volume.pixels >= LOW_HU) & (volume.pixels <= HIGH_HU)
        mask, findings = measure_components(
            volume, inside, LABEL, 1, min_volume_mm3=50.0, uid_seed=uid_seed
        )
        return PipelineResult(
            volume=volume,
            segments=(SegmentResult(1, LABEL, mask.astype(np.bool_)),),
            findings=tuple(findings),
            classifications=(),
            algorithm=self.algorithm,
        )


class HuThresholdKind:
    roles: Mapping[str, BundleRole] = {}  # no model bundle
    emits_segmentation = True

    def build(self, runners: Mapping[str, BundleRunner]) -> Pipeline:
        return HuThresholdPipeline()


KIND = HuThresholdKind()
