"""One series through the whole chain: volume -> pipeline -> SEG + SR files.

Shared by the node's job workers and by batch conversion, so both produce the same
objects from the same input.  Pipelines (ONNX sessions) are loaded once per process.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.config import SENDER, Config, PipelineSettings
from dicomnode.errors import DeliveryError, ImagingError
from dicomnode.imaging.series import load_volume
from dicomnode.inference.card import load_bundle
from dicomnode.inference.runner import BundleRunner
from dicomnode.jobs.queue import Job
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_measurement_report
from dicomnode.pipelines.lesion import LesionPipeline
from dicomnode.pipelines.results import PipelineResult
from dicomnode.spool.index import Index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesOutput:
    series_instance_uid: str
    segmentation: Path
    report: Path
    summary: dict[str, Any]


def summarise(result: PipelineResult) -> dict[str, Any]:
    """A JSON-able digest of a result (no PHI): for job listings and the demo."""
    return {
        "series": result.volume.series_instance_uid,
        "slices": result.volume.shape[0],
        "algorithm": f"{result.algorithm.name} {result.algorithm.version}",
        "findings": [
            {
                "tracking_id": f.tracking_id,
                "volume_mm3": round(f.volume_mm3, 1),
                "longest_diameter_mm": round(f.longest_diameter_mm, 1),
                "mean_hu": round(f.mean_hu, 1),
                "centroid_mm": [round(v, 1) for v in f.centroid_mm],
            }
            for f in result.findings
        ],
        "classifications": [
            {"label": c.label.name, "probability": round(c.probability, 4), "positive": c.positive}
            for c in result.classifications
        ],
    }


def _write(ds: Dataset, path: Path) -> None:
    """Write, fsync, rename, fsync the folder: a result is whole or absent."""
    tmp = path.with_suffix(".part")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Processor:
    """Runs pipelines by name; keeps one loaded pipeline per name for the process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pipelines: dict[str, LesionPipeline] = {}

    def pipeline(self, name: str) -> LesionPipeline:
        if name not in self._pipelines:
            self._pipelines[name] = self._load(self.config.pipeline(name))
        return self._pipelines[name]

    @staticmethod
    def _load(p: PipelineSettings) -> LesionPipeline:
        def runner(path: Path) -> BundleRunner:
            return BundleRunner(
                load_bundle(path), p.providers, tensorrt=p.tensorrt, batch_size=p.batch_size
            )

        cls = runner(p.classification) if p.classification is not None else None
        return LesionPipeline(runner(p.segmentation), cls)

    def process_series(
        self,
        paths: Sequence[Path],
        pipeline: str,
        out_dir: Path,
        uid_seed: str,
        *,
        generation: int = 1,
        previous_reports: Sequence[Path] = (),
    ) -> SeriesOutput:
        volume = load_volume(paths)
        result = self.pipeline(pipeline).run(volume, uid_seed=uid_seed)
        sources = [dcmread(p, stop_before_pixels=True) for p in volume.source_paths]
        previous = [dcmread(p, stop_before_pixels=True) for p in previous_reports if p.is_file()]
        seg = build_segmentation(result, sources, uid_seed=uid_seed, instance_number=generation)
        sr = build_measurement_report(
            result,
            sources,
            seg,
            uid_seed=uid_seed,
            instance_number=generation,
            previous_versions=previous,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("*.part"):  # left by a run that was killed
            stale.unlink(missing_ok=True)
        seg_path = out_dir / f"{volume.series_instance_uid}-seg.dcm"
        sr_path = out_dir / f"{volume.series_instance_uid}-sr.dcm"
        _write(seg, seg_path)
        _write(sr, sr_path)
        return SeriesOutput(volume.series_instance_uid, seg_path, sr_path, summarise(result))

    def process_job(self, job: Job, index: Index) -> tuple[list[tuple[str, Path]], str]:
        """Run a job; returns (destination, file) pairs for the outbox and a JSON summary."""
        route = next((r for r in self.config.routes if r.name == job.route), None)
        if route is None:
            raise ImagingError(f"route {job.route!r} is no longer configured")
        destinations = self._resolve(job, index)
        instances = index.latest_instances(job.study_instance_uid)
        out_dir = self.config.node.data_dir / "results" / f"job-{job.id}"
        outputs: list[tuple[str, Path]] = []
        summaries = []
        for series_uid in job.series_uids:
            paths = [i.path for i in instances if i.series_instance_uid == series_uid]
            if not paths:
                raise ImagingError(f"series {series_uid} has no instances in the spool")
            seed = f"{job.study_instance_uid}/{job.route}/{job.generation}/{series_uid}"
            result = self.process_series(
                paths,
                route.pipeline,
                out_dir,
                seed,
                generation=job.generation,
                previous_reports=self._previous_reports(job, series_uid, index),
            )
            summaries.append(result.summary)
            for d in destinations:
                outputs += [(d, result.segmentation), (d, result.report)]
        return outputs, json.dumps({"series": summaries})

    def _previous_reports(self, job: Job, series_uid: str, index: Index) -> list[Path]:
        """SRs of earlier generations of this (study, route) that this run supersedes."""
        rows = index.connect().execute(
            "SELECT id FROM jobs WHERE study_instance_uid = ? AND route = ? AND generation < ? "
            "AND state IN ('sending', 'done') ORDER BY generation",
            (job.study_instance_uid, job.route, job.generation),
        )
        folder = self.config.node.data_dir / "results"
        return [folder / f"job-{r[0]}" / f"{series_uid}-sr.dcm" for r in rows]

    def _resolve(self, job: Job, index: Index) -> list[str]:
        names = []
        for d in job.destinations:
            if d != SENDER:
                names.append(d)
                continue
            study = index.study(job.study_instance_uid)
            caller = study.calling_ae if study else ""
            remote = self.config.remote_by_ae(caller)
            if remote is None:
                raise DeliveryError(
                    f"the study's sender {caller!r} is not a configured remote; "
                    "add it to [[remotes]] to send results back to it",
                    transient=False,
                )
            names.append(remote.name)
        return names
