"""What a pipeline is: the protocol the study processor runs, and how a kind is declared.

A *pipeline* takes one :class:`~dicomnode.imaging.volume.Volume` and returns a
:class:`~dicomnode.pipelines.results.PipelineResult` (masks, findings, classifications and
the algorithm that made them); it sees our own types only, never a DICOM dataset or a
network event.  A *pipeline kind* is a registered implementation
(:mod:`dicomnode.pipelines.registry`): it names the model bundles it needs by role, each
with the task its card must declare, and builds a pipeline from loaded runners.  See
``docs/pipelines.md`` for a worked example.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dicomnode.imaging.volume import Volume
from dicomnode.inference.runner import BundleRunner, Task
from dicomnode.pipelines.results import AlgorithmInfo, PipelineResult


@runtime_checkable
class Pipeline(Protocol):
    """Volume in; masks, findings and classifications out."""

    @property
    def algorithm(self) -> AlgorithmInfo:
        """The model that produced the result (SEG algorithm identification, SR)."""
        ...

    def run(self, volume: Volume, uid_seed: str) -> PipelineResult:
        """Process one volume; ``uid_seed`` makes derived UIDs deterministic."""
        ...


@runtime_checkable
class ExplainingPipeline(Protocol):
    """A pipeline that can explain its results with heat maps (``heat_maps = true``).

    A kind whose pipelines do says so with ``explains = True`` (checked before any
    session is opened); :func:`dicomnode.pipelines.registry.build_pipeline` then asks the
    built pipeline for its explaining variant."""

    def with_heat_maps(self) -> Pipeline:
        """The same pipeline, its results carrying :class:`~dicomnode.pipelines.results.
        HeatMap` s."""
        ...


def explains(kind: object) -> bool:
    """Whether a kind's pipelines make heat maps (its optional ``explains`` attribute)."""
    return bool(getattr(kind, "explains", False))


@dataclass(frozen=True)
class BundleRole:
    """A model bundle a kind uses: the task its card must declare, and whether it is
    required."""

    task: Task
    required: bool = True


@runtime_checkable
class PipelineKind(Protocol):
    """A registered pipeline implementation (entry point group ``dicomnode.pipelines``)."""

    @property
    def roles(self) -> Mapping[str, BundleRole]:
        """Bundle roles by name (the keys of ``[pipelines.bundles]``)."""
        ...

    @property
    def emits_segmentation(self) -> bool:
        """Whether results carry masks (a SEG is written) or only classifications."""
        ...

    def build(self, runners: Mapping[str, BundleRunner]) -> Pipeline:
        """A pipeline from one loaded runner per configured role."""
        ...
