"""The study processor: one series through the chain volume -> pipeline -> result files.

The files: a SEG when the result has masks, a Parametric Map per heat map (a pipeline with
``heat_maps = true``), a Key Object Selection with the key image of each finding (a
pipeline with ``key_images = true`` and a result with findings), and the SR, which lists
the others as evidence; they are sent in that order.

Shared by the node's job workers and by batch conversion, so both produce the same
objects from the same input.  Pipelines (ONNX sessions) are loaded once per process.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.config import Config
from dicomnode.delivery.hl7 import ClassificationResult, SeriesResult, build_oru, encode
from dicomnode.errors import DicomNodeError, ImagingError
from dicomnode.fsutil import remove_partial_files, write_atomically, write_bytes_atomically
from dicomnode.imaging.series import (
    load_stack,
    select_stack,
    source_datasets,
    volume_from_datasets,
)
from dicomnode.jobs.store import Job, JobStore
from dicomnode.outputs.common import make_reproducible
from dicomnode.outputs.ko import build_key_object_selection
from dicomnode.outputs.layout import (
    ResultFiles,
    job_folder,
    notification_file,
    result_files,
    results_root,
)
from dicomnode.outputs.pm import build_parametric_map
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_measurement_report
from dicomnode.pipelines.base import Pipeline
from dicomnode.pipelines.registry import build_pipeline
from dicomnode.pipelines.results import PipelineResult
from dicomnode.pipelines.triage import evaluate_triage, most_pressing
from dicomnode.spool.index import Index
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom

log = logging.getLogger(__name__)

#: The series :meth:`Processor.warm_up` runs: small, no lesion.
WARM_UP_SERIES = PhantomSpec(rows=64, columns=64, slices=4, n_lesions=0)


@dataclass(frozen=True)
class SeriesOutput:
    series_instance_uid: str
    segmentation: Path | None
    report: Path
    summary: dict[str, Any]
    #: The triage priority (None: the pipeline has no triage rules).
    priority: str | None = None
    #: What the HL7 result message says of this series.
    result: SeriesResult | None = None
    #: The heat maps (Parametric Maps), one per explained label.
    heat_maps: tuple[Path, ...] = ()
    #: The key images of the findings (Key Object Selection); None without findings.
    key_images: Path | None = None

    @property
    def files(self) -> list[Path]:
        """The files written, in the order they are sent: what the SR references (SEG,
        heat maps, key images) before the SR."""
        return [
            p
            for p in (self.segmentation, *self.heat_maps, self.key_images, self.report)
            if p is not None
        ]


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
        "key_images": [
            {
                "tracking_id": f.tracking_id,
                "slice": f.key_slice_index,
                "sop_instance_uid": result.volume.sop_instance_uids[f.key_slice_index],
            }
            for f in result.findings
        ],
        "heat_maps": [
            {"label": h.label.name, "method": h.method, "max": round(int(h.values.max()) / 255, 3)}
            for h in result.heat_maps
        ],
    }


def hl7_result(result: PipelineResult, report: Dataset) -> SeriesResult:
    """The digest of a result an ORU^R01 reports (:mod:`dicomnode.delivery.hl7`)."""
    diameters = [f.longest_diameter_mm for f in result.findings]
    return SeriesResult(
        series_instance_uid=result.volume.series_instance_uid,
        report_sop_instance_uid=str(report.SOPInstanceUID),
        lesion_count=len(result.findings) if result.segments else None,
        largest_diameter_mm=max(diameters) if diameters else None,
        classifications=tuple(
            ClassificationResult(c.label.finding, c.probability, c.positive)
            for c in result.classifications
        ),
    )


@dataclass(frozen=True)
class BuiltResults:
    """The objects of one result, before they are written."""

    segmentation: Dataset | None
    heat_maps: tuple[Dataset, ...]
    key_images: Dataset | None
    report: Dataset


def build_results(
    result: PipelineResult,
    sources: Sequence[Dataset],
    uid_seed: str,
    *,
    generation: int = 1,
    previous: Sequence[Dataset] = (),
    priority: str | None = None,
    omit_empty_frames: bool = False,
    key_images: bool = True,
    created: datetime.datetime | None = None,
) -> BuiltResults:
    """SEG (masks), Parametric Maps (heat maps), KOS (``key_images`` and findings) and the
    SR that lists them."""
    seg = (
        build_segmentation(
            result,
            sources,
            uid_seed=uid_seed,
            instance_number=generation,
            omit_empty_frames=omit_empty_frames,
        )
        if result.segments
        else None
    )
    heat_maps = tuple(
        build_parametric_map(
            result,
            sources,
            index=i,
            series_number=9003 + 10 * i,
            uid_seed=uid_seed,
            instance_number=generation,
        )
        for i in range(len(result.heat_maps))
    )
    kos = (
        build_key_object_selection(result, sources, uid_seed=uid_seed, instance_number=generation)
        if key_images and result.findings
        else None
    )
    sr = build_measurement_report(
        result,
        sources,
        seg,
        uid_seed=uid_seed,
        instance_number=generation,
        previous_versions=previous,
        priority=priority,
        related=[*heat_maps, *([] if kos is None else [kos])],
    )
    for ds in (seg, *heat_maps, kos, sr):
        if ds is not None:
            make_reproducible(ds, uid_seed, created)
    return BuiltResults(seg, heat_maps, kos, sr)


def _write(ds: Dataset, path: Path) -> None:
    """A result is whole or absent (:func:`dicomnode.fsutil.write_atomically`)."""
    write_atomically(path, lambda f: ds.save_as(f, enforce_file_format=True))


class Processor:
    """Runs pipelines by name; keeps one built pipeline per name for the process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pipelines: dict[str, Pipeline] = {}

    def pipeline(self, name: str) -> Pipeline:
        if name not in self._pipelines:
            self._pipelines[name] = build_pipeline(self.config.pipeline(name))
        return self._pipelines[name]

    def warm_up(self) -> None:
        """Open every configured pipeline and run it once on a small synthetic series, its
        SEG and SR built but not written.

        What is paid once per process is then paid before the first study, not by it:
        opening the sessions and their first runs, and highdicom's tables of the standard
        (0.5 s and about 80 MB when first used).  A pipeline that fails here is logged;
        the first job that needs it reports the error.
        """
        phantom = generate_phantom(WARM_UP_SERIES)
        volume = volume_from_datasets(phantom.datasets)
        for settings in self.config.pipelines:
            started = time.monotonic()
            try:
                result = self.pipeline(settings.name).run(volume, uid_seed="warm-up")
                build_results(result, phantom.datasets, "warm-up")
            except Exception as exc:  # the job reports it, with the study it concerns
                log.warning("pipeline %s: warm-up failed: %s", settings.name, exc)
                continue
            log.info("pipeline %s warmed up in %.1f s", settings.name, time.monotonic() - started)

    def process_series(
        self,
        paths: Sequence[Path],
        pipeline: str,
        files: ResultFiles,
        uid_seed: str,
        *,
        generation: int = 1,
        previous_reports: Sequence[Path] = (),
        created: datetime.datetime | None = None,
    ) -> SeriesOutput:
        """One series through the pipeline into ``files``: a SEG when the result has
        masks, and the SR.  The series' largest consistent stack is processed
        (:func:`dicomnode.imaging.series.select_stack`); what was left out is logged and
        recorded in the summary (``stack``)."""
        choice = select_stack(paths)
        volume = load_stack(choice)
        if choice.note:
            log.info("series %s: %s", volume.series_instance_uid, choice.note)
        result = self.pipeline(pipeline).run(volume, uid_seed=uid_seed)
        rules = self.config.pipeline(pipeline).triage
        priority = evaluate_triage(rules, result) if rules else None
        sources = source_datasets(volume, dict(zip(choice.paths, choice.headers, strict=False)))
        previous = [dcmread(p, stop_before_pixels=True) for p in previous_reports if p.is_file()]
        settings = self.config.pipeline(pipeline)
        built = build_results(
            result,
            sources,
            uid_seed,
            generation=generation,
            previous=previous,
            priority=priority,
            omit_empty_frames=settings.omit_empty_frames,
            key_images=settings.key_images,
            created=created,
        )
        seg, sr = built.segmentation, built.report
        remove_partial_files(files.report.parent)  # left by a run that was killed
        if seg is not None:
            _write(seg, files.segmentation)
        heat_maps = []
        for i, pm in enumerate(built.heat_maps):
            heat_maps.append(files.heat_map_of(i))
            _write(pm, heat_maps[-1])
        if built.key_images is not None:
            _write(built.key_images, files.key_images)
        _write(sr, files.report)
        summary = summarise(result)
        summary["stack"] = choice.note
        summary["left_out"] = {reason: count for reason, count in choice.left_out}
        summary["priority"] = priority
        return SeriesOutput(
            volume.series_instance_uid,
            files.segmentation if seg is not None else None,
            files.report,
            summary,
            priority,
            hl7_result(result, sr),
            tuple(heat_maps),
            files.key_images if built.key_images is not None else None,
        )

    def process_job(
        self, job: Job, destinations: Sequence[str], index: Index, jobs: JobStore
    ) -> JobOutcome:
        """Run a job series by series: a series that cannot be processed is reported and the
        others still get their results.

        Raises when every series failed (the first error), or when one failed with a
        transient error (the whole job is retried; results are deterministic)."""
        route = next((r for r in self.config.routes if r.name == job.route), None)
        if route is None:
            raise ImagingError(f"route {job.route!r} is no longer configured")
        instances = index.latest_instances(job.study_instance_uid, driving=True)
        results = results_root(self.config.node.data_dir)
        folder = job_folder(results, job.id)
        earlier = jobs.earlier_generations(job)
        outcome = JobOutcome()
        summaries: list[dict[str, Any]] = []
        errors: list[DicomNodeError] = []
        processed: list[tuple[Path, SeriesOutput]] = []
        hl7 = [d for d in destinations if self.config.hl7_by_name(d) is not None]
        for series_uid in job.series_uids:
            paths = [i.path for i in instances if i.series_instance_uid == series_uid]
            seed = f"{job.study_instance_uid}/{job.route}/{job.generation}/{series_uid}"
            previous = [
                result_files(job_folder(results, e.id), series_uid, job.route).report
                for e in earlier
            ]
            try:
                if not paths:
                    raise ImagingError(f"series {series_uid} has no images in the spool")
                result = self.process_series(
                    paths,
                    route.pipeline,
                    result_files(folder, series_uid, job.route),
                    seed,
                    generation=job.generation,
                    previous_reports=previous,
                )
            except DicomNodeError as exc:
                if exc.transient:
                    raise
                errors.append(exc)
                outcome.failures.append((series_uid, f"{type(exc).__name__}: {exc}"))
                log.error("job %d: series %s not processed: %s", job.id, series_uid, exc)
                continue
            summaries.append(result.summary)
            processed.append((paths[0], result))
            for d in destinations:
                if d not in hl7:
                    outcome.outputs += [(d, path) for path in result.files]
        if errors and not summaries:
            raise errors[0]
        outcome.priority = most_pressing(o.priority for _, o in processed if o.priority)
        if hl7 and processed:
            oru = self._write_oru(job, folder, processed, outcome.priority)
            outcome.outputs += [(d, oru) for d in hl7]
        outcome.summary = json.dumps(
            {
                "series": summaries,
                "failed": [{"series": s, "error": e} for s, e in outcome.failures],
                "priority": outcome.priority,
            }
        )
        return outcome

    def _write_oru(
        self, job: Job, folder: Path, processed: Sequence[tuple[Path, SeriesOutput]], priority: str
    ) -> Path:
        """The job's ORU^R01 for the HL7 destinations: ``<route>-oru.hl7`` in its folder."""
        header = dcmread(processed[0][0], stop_before_pixels=True)
        series = [o.result for _, o in processed if o.result is not None]
        message = build_oru(
            header, series, priority, f"DN{job.id}", application=self.config.node.ae_title
        )
        path = notification_file(folder, job.route)
        write_bytes_atomically(path, encode(message))
        return path


@dataclass
class JobOutcome:
    """What a job produced: (destination, file) pairs for the outbox, a JSON summary, and
    the series that could not be processed with why."""

    outputs: list[tuple[str, Path]] = field(default_factory=list)
    summary: str = "{}"
    failures: list[tuple[str, str]] = field(default_factory=list)
    #: The most pressing triage priority of the job's series (``routine``: none).
    priority: str = "routine"

    @property
    def note(self) -> str:
        """The job's error line when some series failed ("" when none did)."""
        if not self.failures:
            return ""
        first = self.failures[0]
        return (
            f"{len(self.failures)} series not processed (others delivered); "
            f"series {first[0]}: {first[1]}"
        )[:2000]
