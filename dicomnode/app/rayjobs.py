"""The node's jobs on a Ray cluster (``[node] worker_backend = "ray"``).

The node keeps everything it owns: the spool, the index, the job queue and the outbox stay
on its own disk, and only the node runs SQL on them.  ``[ray].actors`` threads of the node
each run the ordinary job loop (:func:`dicomnode.app.worker.work`: claim, run, hand the
results to the outbox, back off or dead-letter) with one actor of the cluster
(:class:`JobWorker`, its model sessions loaded once) doing the processing:

- the job's images travel to the actor through Ray's object store, as bytes read from the
  spool (no shared file system is needed between the node and the cluster; a study of 300
  CT slices is about 160 MB), with the reports of earlier generations the job supersedes;
- the actor runs the node's own study processor on them in a scratch data directory laid
  out like the node's, and returns the files of the job's result folder as bytes;
- the node writes them into its result folder (atomically) and queues them in the outbox
  in one transaction, exactly as a local worker does.

A node of the cluster that dies mid-job costs nothing: the actor is restarted on a node with
room (``max_restarts = -1``), the job fails transiently (:class:`RayWorkerLostError`) and
the queue runs it again after its back-off, up to ``[jobs].max_attempts`` times.  A
restarting actor refuses calls at once, so Ray's own call retries would be spent in
milliseconds, and so would the attempts of every job its thread took next: the thread takes
no job until its actor answers again (probed every ``RESTART_PROBE_S``).  Nothing is
acknowledged or delivered from the cluster: instances are acknowledged when they are in the
node's spool, and results are queued only once they are on the node's disk.  A job run
twice writes the same files (UIDs from seeds), the second copy replacing the first.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from dicomnode.app.processor import JobOutcome, Processor
from dicomnode.app.raybackend import (
    RESTART_PROBE_S,
    actor_options,
    connect,
    share_threads,
    worker_stats,
)
from dicomnode.app.worker import WorkerContext, run_one
from dicomnode.config import Config
from dicomnode.errors import DicomNodeError
from dicomnode.fsutil import write_bytes_atomically
from dicomnode.jobs.store import Job, JobStore
from dicomnode.outputs.layout import job_folder, result_files, results_root
from dicomnode.spool.index import Index, InstanceRecord

log = logging.getLogger(__name__)


class RayWorkerLostError(DicomNodeError):
    """The Ray actor running a job died (its node was lost) or is being restarted."""

    transient = True


@dataclasses.dataclass(frozen=True)
class JobInputs:
    """What a job reads, as it travels to the actor: the instances (paths relative to the
    data directory) with their bytes, and earlier reports (relative path, bytes)."""

    instances: tuple[InstanceRecord, ...]
    files: tuple[bytes, ...]
    earlier: tuple[Job, ...]
    previous_reports: tuple[tuple[str, bytes], ...]


@dataclasses.dataclass(frozen=True)
class JobResults:
    """What comes back: the files of the job's result folder (relative to the data
    directory) and the outcome, its outputs' paths relative to the data directory."""

    files: tuple[tuple[str, bytes], ...]
    outputs: tuple[tuple[str, str], ...]
    summary: str
    failures: tuple[tuple[str, str], ...]
    priority: str
    node_id: str


class _ShippedIndex:
    """The index as the study processor reads it for one job: its instances."""

    def __init__(self, instances: Sequence[InstanceRecord]) -> None:
        self.instances = list(instances)

    def latest_instances(self, study_uid: str, *, driving: bool = False) -> list[InstanceRecord]:
        return [i for i in self.instances if i.study_instance_uid == study_uid]


class _ShippedJobs:
    """The job store as the study processor reads it for one job: earlier generations."""

    def __init__(self, earlier: Sequence[Job]) -> None:
        self.earlier = list(earlier)

    def earlier_generations(self, job: Job) -> list[Job]:
        return self.earlier


class JobWorker:
    """A study processor on the cluster for the node's jobs (model sessions loaded once
    and warmed up, as in a local worker), working in a scratch data directory of its own."""

    def __init__(self, config: Config) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="dicomnode-job-"))
        node = dataclasses.replace(config.node, data_dir=self.scratch)
        self.config = dataclasses.replace(config, node=node)
        share_threads(config)
        self.processor = Processor(self.config)
        self.processor.warm_up()  # as a local worker: sessions open, first runs paid

    def process(self, job: Job, destinations: list[str], inputs: JobInputs) -> JobResults:
        for folder in self.scratch.iterdir():
            shutil.rmtree(folder)
        instances = []
        for record, data in zip(inputs.instances, inputs.files, strict=True):
            path = self.scratch / record.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            instances.append(dataclasses.replace(record, path=path))
        for relative, data in inputs.previous_reports:
            path = self.scratch / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        outcome = self.processor.process_job(
            job,
            destinations,
            cast(Index, _ShippedIndex(instances)),
            cast(JobStore, _ShippedJobs(inputs.earlier)),
        )
        folder = job_folder(results_root(self.scratch), job.id)
        files = tuple(
            (p.relative_to(self.scratch).as_posix(), p.read_bytes())
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        )
        return JobResults(
            files=files,
            outputs=tuple((d, p.relative_to(self.scratch).as_posix()) for d, p in outcome.outputs),
            summary=outcome.summary,
            failures=tuple(outcome.failures),
            priority=outcome.priority,
            node_id=ray.get_runtime_context().get_node_id(),
        )

    def node_id(self) -> str:
        """The node this actor runs on (the probe of a restarting actor)."""
        return str(ray.get_runtime_context().get_node_id())

    def stats(self) -> dict[str, Any]:
        return worker_stats()


JobActor = ray.remote(JobWorker)


def _relative(path: Path, data_dir: Path) -> str:
    try:
        return path.resolve().relative_to(data_dir.resolve()).as_posix()
    except ValueError:  # stored outside the data directory: keep its name under spool/
        return f"spool/outside/{path.name}"


class RayJobs:
    """The node's job loops, one thread per actor of the cluster at ``[ray].address``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._disconnect = connect(config.ray.address)
        self.actors: list[Any] = [
            JobActor.options(**options).remote(config) for options in actor_options(config.ray)
        ]
        log.info(
            "jobs run on Ray (%s): %d actor(s), %s CPU and %s GPU each",
            config.ray.address or "local instance",
            len(self.actors),
            config.ray.num_cpus,
            config.ray.num_gpus,
        )

    def run(self, number: int, stop: threading.Event) -> None:
        """Thread ``number``'s job loop, with actor ``number``, until ``stop`` is set."""
        if not self.await_actor(number, stop, restarting=False):
            return  # it claims no job before its actor runs: the others take them
        ctx = WorkerContext.open(self.config)
        actor = self.actors[number]
        lost = threading.Event()

        def process(job: Job, destinations: list[str]) -> JobOutcome:
            try:
                return self.process(ctx, actor, job, destinations)
            except RayWorkerLostError:
                lost.set()
                raise

        while not stop.is_set():
            if lost.is_set():  # the job went back to the queue; take none until it answers
                lost.clear()
                if not self.await_actor(number, stop):
                    return  # its job loop ends: /readyz says so
            elif run_one(ctx, process) is None:
                stop.wait(0.2)

    def await_actor(
        self,
        number: int,
        stop: threading.Event,
        warn_after_s: float = 60.0,
        *,
        restarting: bool = True,
    ) -> bool:
        """Wait until actor ``number`` answers (Ray starts it, or restarts it on a node with
        room): True; False when ``stop`` is set first or Ray gave up on the actor."""
        actor = self.actors[number]
        if restarting:
            log.info("Ray actor %d is restarting", number)
        started = warned = time.monotonic()
        while not stop.is_set():
            try:
                node = ray.get(actor.node_id.remote(), timeout=10 * RESTART_PROBE_S)
            except (ActorUnavailableError, GetTimeoutError):
                now = time.monotonic()
                if now - warned >= warn_after_s:
                    warned = now
                    log.warning(
                        "Ray actor %d has not answered for %.0f s (no node of the cluster "
                        "has room for it?); its jobs wait for the other actors",
                        number,
                        now - started,
                    )
                stop.wait(RESTART_PROBE_S)
                continue
            except RayActorError as exc:  # dead for good (Ray gave up restarting it)
                log.error("Ray actor %d is lost: %s; its job loop ends", number, exc)
                return False
            if restarting:
                log.info("Ray actor %d answers on node %s", number, node)
            else:
                log.info("Ray actor %d started on node %s", number, node)
            return True
        return False

    def inputs(self, ctx: WorkerContext, job: Job) -> JobInputs:
        data_dir = self.config.node.data_dir
        wanted = set(job.series_uids)
        records = [
            i
            for i in ctx.index.latest_instances(job.study_instance_uid, driving=True)
            if i.series_instance_uid in wanted
        ]
        files = tuple(i.path.read_bytes() for i in records)
        shipped = tuple(
            dataclasses.replace(i, path=Path(_relative(i.path, data_dir))) for i in records
        )
        earlier = tuple(ctx.jobs.earlier_generations(job))
        results = results_root(data_dir)
        previous = []
        for e in earlier:
            for series in job.series_uids:
                report = result_files(job_folder(results, e.id), series, job.route).report
                if report.is_file():
                    previous.append((_relative(report, data_dir), report.read_bytes()))
        return JobInputs(shipped, files, earlier, tuple(previous))

    def process(
        self, ctx: WorkerContext, actor: Any, job: Job, destinations: list[str]
    ) -> JobOutcome:
        inputs = self.inputs(ctx, job)
        try:
            results: JobResults = ray.get(actor.process.remote(job, destinations, ray.put(inputs)))
        except RayTaskError as exc:
            if isinstance(exc.cause, DicomNodeError):
                raise exc.cause from None
            raise
        except RayActorError as exc:
            raise RayWorkerLostError(
                f"the Ray actor running the job was lost ({type(exc).__name__}); "
                "it is restarted on a node with room"
            ) from exc
        data_dir = self.config.node.data_dir
        for relative, data in results.files:
            write_bytes_atomically(data_dir / relative, data)
        log.info("job %d: processed on node %s", job.id, results.node_id)
        return JobOutcome(
            outputs=[(d, data_dir / relative) for d, relative in results.outputs],
            summary=results.summary,
            failures=list(results.failures),
            priority=results.priority,
        )

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._disconnect:
            ray.shutdown()
