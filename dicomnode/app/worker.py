"""The job loop and the worker processes that run it.

A worker claims a due job (:meth:`JobStore.claim`), resolves its destinations (delivery's
rule, first, so a study that cannot be sent back fails before any inference), runs the
study processor, and hands the result files to the outbox, which moves the job on in the
same transaction.  Errors back off (transient) or dead-letter (permanent).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

from dicomnode.app.logformat import LogFormat, configure_logging
from dicomnode.app.metrics import JobObserver, NullJobObserver, PipeJobObserver, runners_of
from dicomnode.app.processor import JobOutcome, Processor, SeriesOutput
from dicomnode.audit import AuditLog
from dicomnode.config import Config
from dicomnode.db import Database
from dicomnode.delivery.deliverer import resolve_destinations
from dicomnode.delivery.store import Outbox
from dicomnode.errors import DicomNodeError
from dicomnode.imaging.volume import Volume
from dicomnode.jobs.store import FAILED, Job, JobStore
from dicomnode.outputs.layout import ResultFiles
from dicomnode.pipelines.base import Pipeline
from dicomnode.pipelines.results import PipelineResult
from dicomnode.spool.index import Index

log = logging.getLogger(__name__)

#: A worker process's plain log line.
WORKER_FORMAT = "%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s"

#: Runs a job for the given destination names.
ProcessFn = Callable[[Job, list[str]], JobOutcome]


@dataclass(frozen=True)
class WorkerContext:
    """What a job loop needs, opened once per thread or process."""

    config: Config
    index: Index
    jobs: JobStore
    outbox: Outbox
    audit: AuditLog

    @classmethod
    def open(cls, config: Config) -> WorkerContext:
        db = Database(config.node.data_dir)
        jobs = JobStore(db, config.jobs)
        return cls(
            config,
            Index(db),
            jobs,
            Outbox(db, jobs, config.delivery),
            AuditLog(config.node.audit_path),
        )

    def destinations(self, job: Job) -> list[str]:
        study = self.index.study(job.study_instance_uid)
        return resolve_destinations(
            self.config, job.destinations, study.calling_ae if study else ""
        )


def run_one(ctx: WorkerContext, process: ProcessFn) -> Job | None:
    """Claim and run one due job, if any; returns it (as claimed) or None."""
    job = ctx.jobs.claim(aging_s=ctx.config.priority.aging_s)
    if job is None:
        return None
    ctx.audit.record(
        "job",
        job_id=job.id,
        state="running",
        attempt=job.attempts,
        route=job.route,
        study_instance_uid=job.study_instance_uid,
        generation=job.generation,
    )
    log.info(
        "job %d: %s generation %d, attempt %d", job.id, job.route, job.generation, job.attempts
    )
    try:
        outcome = process(job, ctx.destinations(job))
    except DicomNodeError as exc:
        error = f"{type(exc).__name__}: {exc}"
        state = ctx.outbox.job_failed(job.id, error, transient=exc.transient)
        (log.error if state == FAILED else log.warning)("job %d: %s -> %s", job.id, exc, state)
        ctx.audit.record("job", job_id=job.id, state=str(state), error=error[:300])
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise  # the process is being stopped: recovery re-queues the job at next start
    except BaseException as exc:  # e.g. a native decoder's panic (pyo3 PanicException)
        log.exception("job %d crashed", job.id)
        state = ctx.outbox.job_failed(
            job.id, f"unexpected {type(exc).__name__}: {exc}", transient=True
        )
        log.warning("job %d -> %s", job.id, state)
        ctx.audit.record("job", job_id=job.id, state=str(state), error=type(exc).__name__)
    else:
        for series, error in outcome.failures:
            ctx.audit.record(
                "series",
                outcome="failed",
                job_id=job.id,
                study_instance_uid=job.study_instance_uid,
                series_instance_uid=series,
                error=error[:300],
            )
        state = ctx.outbox.accept_results(
            job.id, outcome.outputs, outcome.summary, outcome.note, outcome.priority
        )
        log.info(
            "job %d: %d file(s) queued for delivery%s",
            job.id,
            len(outcome.outputs),
            f"; {len(outcome.failures)} series not processed" if outcome.failures else "",
        )
        ctx.audit.record(
            "job",
            job_id=job.id,
            state=str(state),
            outputs=len(outcome.outputs),
            priority=outcome.priority,
        )
    return job


def work(
    ctx: WorkerContext, process: ProcessFn, stop: threading.Event, poll_s: float = 0.2
) -> None:
    """Run jobs until ``stop`` is set; a job in progress is always finished first."""
    while not stop.is_set():
        if run_one(ctx, process) is None:
            stop.wait(poll_s)


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the node process dies (no orphan worker may
    keep taking jobs next to a restarted node); checked again in case it died first."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def worker_main(
    config: Config,
    log_level: str,
    parent: int,
    metrics: Connection | None = None,
    log_format: LogFormat = "text",
) -> None:
    """Entry point of a worker process: run jobs until SIGTERM, finishing the current one.

    ``metrics`` is the sending end of the pipe the node reads job phases from."""
    die_with_parent(parent)
    configure_logging(log_level, log_format, WORKER_FORMAT)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_jobs(config, stop, PipeJobObserver(metrics) if metrics is not None else None)


class _TimedPipeline:
    """A pipeline whose ``run`` (the inference phase) is timed."""

    def __init__(self, inner: Pipeline, marks: dict[str, float]) -> None:
        self.inner = inner
        self.marks = marks

    @property
    def algorithm(self) -> Any:
        return self.inner.algorithm

    def run(self, volume: Volume, uid_seed: str) -> PipelineResult:
        self.marks["run"] = time.monotonic()
        try:
            return self.inner.run(volume, uid_seed)
        finally:
            self.marks["ran"] = time.monotonic()


class TimedProcessor(Processor):
    """The study processor, telling ``observer`` each series' phases: load (selection and
    volume), inference (the pipeline's run) and encoding (SEG, SR and their files), and
    the execution provider each model runs on."""

    def __init__(self, config: Config, observer: JobObserver) -> None:
        super().__init__(config)
        self.observer = observer
        self.marks: dict[str, float] = {}
        #: Seconds per phase since the last :meth:`take_phases`.
        self.phases: dict[str, float] = {}

    def pipeline(self, name: str) -> Pipeline:
        inner = super().pipeline(name)
        for runner in runners_of(inner):
            self.observer.provider(name, runner.card.name, runner.choice.active[0])
        return _TimedPipeline(inner, self.marks)

    def process_series(
        self, paths: Any, pipeline: str, files: ResultFiles, uid_seed: str, **kwargs: Any
    ) -> SeriesOutput:
        self.marks.clear()
        started = time.monotonic()
        output = super().process_series(paths, pipeline, files, uid_seed, **kwargs)
        ended = time.monotonic()
        run, ran = self.marks.get("run", started), self.marks.get("ran", started)
        for phase, seconds in (
            ("load", run - started),
            ("inference", ran - run),
            ("encoding", ended - ran),
        ):
            self.observer.phase(pipeline, phase, seconds)
            self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        return output

    def take_phases(self) -> str:
        """``load 0.4 s, inference 2.1 s, encoding 0.3 s`` of the series since last asked."""
        text = ", ".join(f"{p} {s:.1f} s" for p, s in self.phases.items())
        self.phases = {}
        return text


def run_jobs(config: Config, stop: threading.Event, observer: JobObserver | None = None) -> None:
    """Open the stores and a study processor, and run jobs until ``stop`` is set."""
    ctx = WorkerContext.open(config)
    processor = TimedProcessor(config, observer or NullJobObserver())
    processor.warm_up()

    def process(job: Job, names: list[str]) -> JobOutcome:
        started = time.monotonic()
        outcome = processor.process_job(job, names, ctx.index, ctx.jobs)
        log.info(
            "job %d: processed in %.1f s (%s)",
            job.id,
            time.monotonic() - started,
            processor.take_phases() or "no series",
        )
        return outcome

    work(ctx, process, stop)
