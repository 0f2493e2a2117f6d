"""The classification pipeline: one classifier bundle -> study-level classifications.

No masks and no findings: the node writes a TID 1500 SR with one qualitative evaluation
and probability per label, and no SEG.  Per-slice probabilities are aggregated per label
as the card says (``max`` or ``mean`` over the slices).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Label
from dicomnode.inference.runner import BundleRunner
from dicomnode.inference.slabs import iter_slabs, slab_slices
from dicomnode.pipelines.base import BundleRole, Pipeline
from dicomnode.pipelines.results import (
    ALGORITHM_FAMILY,
    AlgorithmInfo,
    Classification,
    PipelineResult,
)

log = logging.getLogger(__name__)


def classify_volume(runner: BundleRunner, volume: Volume) -> list[Classification]:
    """One classification per label of the runner's card, aggregated over the slices.

    The volume goes through the model in slabs (:mod:`dicomnode.inference.slabs`)."""
    card = runner.card
    slabs = iter_slabs(
        volume.pixels,
        volume.pixel_spacing,
        card.preprocessing,
        slices=slab_slices(runner.batch_size),
        context=card.input.context_slices,
    )
    return aggregate(runner, np.concatenate([runner.classify_slab(slab) for slab in slabs]))


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

    @property
    def algorithm(self) -> AlgorithmInfo:
        return algorithm_of(self.classifier)

    def run(self, volume: Volume, uid_seed: str) -> PipelineResult:
        classifications = classify_volume(self.classifier, volume)
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
        )


class ClassificationKind:
    """``kind = "classification"``: ``bundles.classification`` only; an SR, no SEG."""

    roles: Mapping[str, BundleRole] = {"classification": BundleRole("classification")}
    emits_segmentation = False

    def build(self, runners: Mapping[str, BundleRunner]) -> Pipeline:
        return ClassificationPipeline(runners["classification"])


KIND = ClassificationKind()
