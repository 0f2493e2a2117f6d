"""Batch conversion on a Ray cluster: the only module, with :mod:`dicomnode.app.rayjobs`,
that imports Ray (the ``ray`` extra); nothing imports it unless Ray is asked for.

The input is listed and its headers read by Ray tasks, one per top-level folder of the
input (files directly in it: chunks of :data:`SCAN_CHUNK`), spread over the cluster; the
driver merges and groups them exactly as :func:`dicomnode.routing.select.scan_folder`
does, so the studies, their series and the order of their files are the same.

Each study is then processed by one of ``[ray].actors`` actors (:class:`StudyWorker`),
each holding a study processor whose model sessions are loaded once, when the actor
starts, and reserving ``[ray].num_cpus`` / ``num_gpus`` / ``memory_mb`` of the cluster;
the actors are spread over the nodes by room (:func:`placements`).
An actor reads the study's files and writes its results under the output folder itself:
input and output folders must be the same paths on every node (shared storage,
docs/scale-out.md).  Actors are restarted when they die (``max_restarts = -1``, on any node
with room), and a study in hand when its node died is sent again after the back-off of
``[jobs]`` (a restarting actor refuses calls; Ray's own ``max_task_retries`` would spend
its retries at once), at most ``[jobs].max_attempts`` times in all; after that it is
reported failed and the batch goes on.  Results are deterministic (UIDs from seeds), so a
study run twice writes the same files.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
from pydicom import dcmread
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dicomnode.app.batch import StudyTask, process_study
from dicomnode.app.processor import Processor
from dicomnode.config import Config, RaySettings
from dicomnode.inference.runner import THREADS_ENV

log = logging.getLogger(__name__)

#: Files of one header-reading task when they lie directly in the input folder.
SCAN_CHUNK = 512
#: Actor calls in flight per actor (the next study is waiting when one finishes).
IN_FLIGHT = 2
#: After this long, actors still starting are reported (the cluster may lack room).
STARTUP_WARNING_S = 60.0


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (``""``: start a local Ray instance, ``auto``:
    the cluster of this machine); returns whether this call connected (and so should
    disconnect)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    # Ray's core worker installs its own SIGTERM handler (it ends the process at once): put
    # back the caller's, so that the node's first SIGTERM still stops it gracefully.
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(include_dashboard=False, **options)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    return True


def actor_options(settings: RaySettings) -> list[dict[str, Any]]:
    """Each of the ``settings.actors`` actors' options: what it reserves on the cluster,
    its restart policy and where it goes (:func:`placements`)."""
    options: dict[str, Any] = {
        "num_cpus": settings.num_cpus,
        "num_gpus": settings.num_gpus,
        "max_restarts": -1,
    }
    if settings.memory_mb:
        options["memory"] = settings.memory_mb * 2**20
    return [{**options, "scheduling_strategy": s} for s in placements(settings)]


def placements(settings: RaySettings) -> list[Any]:
    """Where each actor goes: actor by actor, to the alive node with the most room left
    for one more (its CPU and GPU slots over the actor's, less the actors already placed
    there), as soft node affinity: an actor restarted after its node died, or one that
    does not fit where it was sent, goes to any node with room.  ``SPREAD`` (Ray's best
    effort) for actors no node has room for: they start when the cluster grows."""
    room: dict[str, float] = {}
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        slots = [
            resources.get(name, 0.0) / want
            for name, want in (("CPU", settings.num_cpus), ("GPU", settings.num_gpus))
            if want > 0
        ]
        room[node["NodeID"]] = float(int(min(slots))) if slots else float("inf")
    chosen: list[Any] = []
    for _ in range(settings.actors):
        best = max(room, key=room.__getitem__, default=None)
        if best is None or room[best] < 1:
            chosen.append("SPREAD")
            continue
        room[best] -= 1
        chosen.append(NodeAffinitySchedulingStrategy(best, soft=True))
    return chosen


def worker_stats() -> dict[str, Any]:
    """Where this process runs, its memory (peak and current resident set, MiB) and the
    CPU time it has used (seconds)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
        "pid": os.getpid(),
        "max_rss_mb": usage.ru_maxrss / 1024,
        "rss_mb": resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20,
    }


def share_threads(config: Config) -> None:
    """In an actor: its model sessions use as many threads as it has CPU slots
    (``[ray].num_cpus``, at least one), not every core of its node, which other actors
    share (:data:`dicomnode.inference.runner.THREADS_ENV`)."""
    os.environ[THREADS_ENV] = str(max(1, math.ceil(config.ray.num_cpus)))


def load_pipelines(processor: Processor, config: Config) -> None:
    """Open every configured pipeline now, once per process; one that fails is logged
    and each study that needs it reports the error."""
    for settings in config.pipelines:
        try:
            processor.pipeline(settings.name)
        except Exception as exc:
            log.warning("pipeline %s cannot be loaded: %s", settings.name, exc)


# --- listing and reading headers on the cluster ----------------------------------------

#: (path, Study Instance UID, Series Instance UID) of a readable file; (path, "", reason)
#: of a file skipped.
HeaderRow = tuple[str, str, str]


def read_headers(folder: str | None, files: Sequence[str]) -> list[HeaderRow]:
    """The study and series of every file under ``folder`` (recursively) and of ``files``,
    reading headers only."""
    paths = [Path(f) for f in files]
    if folder is not None:
        paths += [p for p in Path(folder).rglob("*") if p.is_file()]
    rows = []
    for path in paths:
        try:
            ds = dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
            )
            rows.append((str(path), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
        except Exception as exc:
            rows.append((str(path), "", f"{exc}"))
    return rows


read_headers_task = ray.remote(read_headers)


def scan_on_cluster(input_dir: Path) -> dict[str, dict[str, list[Path]]]:
    """:func:`~dicomnode.routing.select.scan_folder`, its listing and header reading done
    by tasks on the cluster (one per top-level folder; files in ``input_dir`` itself in
    chunks)."""
    entries = sorted(input_dir.iterdir())
    files = [str(p) for p in entries if p.is_file()]
    units: list[tuple[str | None, list[str]]] = [(str(p), []) for p in entries if p.is_dir()]
    units += [(None, files[i : i + SCAN_CHUNK]) for i in range(0, len(files), SCAN_CHUNK)]
    task = read_headers_task.options(scheduling_strategy="SPREAD")
    rows: list[HeaderRow] = []
    for part in ray.get([task.remote(folder, chunk) for folder, chunk in units]):
        rows += part
    studies: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path, study, series in sorted(rows, key=lambda row: Path(row[0])):
        if not study:
            log.warning("skipping %s: not a readable DICOM file (%s)", path, series)
            continue
        studies[study][series].append(Path(path))
    return {k: dict(v) for k, v in studies.items()}


# --- actors ------------------------------------------------------------------------------


class StudyWorker:
    """A study processor on the cluster: its model sessions loaded once, when it starts."""

    def __init__(self, config: Config, output_dir: str) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        share_threads(config)
        self.processor = Processor(config)
        load_pipelines(self.processor, config)

    def process(self, task: StudyTask) -> tuple[dict[str, Any], str]:
        """The study's manifest entry, and where it ran (node id)."""
        entry = process_study(self.config, self.processor, task, self.output_dir)
        return entry, ray.get_runtime_context().get_node_id()

    def stats(self) -> dict[str, Any]:
        return worker_stats()


StudyActor = ray.remote(StudyWorker)


class RayStudyRunner:
    """Studies on ``[ray].actors`` actors of the cluster at ``address``
    (:class:`~dicomnode.app.batch.StudyRunner`)."""

    def __init__(self, config: Config, output_dir: Path, address: str) -> None:
        self.config = config
        self.output_dir = output_dir
        self._disconnect = connect(address)
        self.actors: list[Any] = []
        self._queue: list[tuple[float, StudyTask]] = []
        self._attempts: dict[str, int] = {}
        #: Study -> the node id it was processed on.
        self.placement: dict[str, str] = {}

    def scan(self, input_dir: Path) -> dict[str, dict[str, list[Path]]]:
        return scan_on_cluster(input_dir)

    def _start_actors(self) -> None:
        if not self.actors:
            self.actors = [
                StudyActor.options(**options).remote(self.config, str(self.output_dir))
                for options in actor_options(self.config.ray)
            ]

    def run(self, tasks: Sequence[StudyTask]) -> Iterator[tuple[StudyTask, dict[str, Any]]]:
        """Send each study to an actor that has started (at most :data:`IN_FLIGHT` each);
        a study whose actor died is sent again after the back-off of ``[jobs]``."""
        if not tasks:
            return
        self._start_actors()
        #: (when it may be sent, the study), the next one last.
        self._queue = [(0.0, task) for task in reversed(tasks)]
        self._attempts = {}
        starting = {a.__ray_ready__.remote(): n for n, a in enumerate(self.actors)}
        busy: dict[int, int] = {}  # actors started -> studies in flight
        running: dict[Any, tuple[StudyTask, int]] = {}
        since = time.monotonic()
        while self._queue or running:
            now = time.monotonic()
            for number in sorted(busy, key=busy.__getitem__):
                if self._queue and self._queue[-1][0] <= now and busy[number] < IN_FLIGHT:
                    _, task = self._queue.pop()
                    study = task.study_instance_uid
                    self._attempts[study] = self._attempts.get(study, 0) + 1
                    running[self.actors[number].process.remote(task)] = (task, number)
                    busy[number] += 1
            if not busy and not starting:
                yield from self._fail_all("no Ray actor could start (see the log)")
                return
            if starting and time.monotonic() - since > STARTUP_WARNING_S:
                self._warn_starting(len(starting))
                since = float("inf")
            wake = max(0.05, self._queue[-1][0] - now) if self._queue else 1.0
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=wake)
            for ref in done:
                if ref in starting:
                    number = starting.pop(ref)
                    if self._started(ref, number):
                        busy[number] = 0
                    continue
                task, number = running.pop(ref)
                busy[number] -= 1
                entry = self._entry(ref, task)
                if entry is not None:
                    yield task, entry

    def _started(self, ref: Any, number: int) -> bool:
        try:
            ray.get(ref)
        except RayError as exc:
            log.error("Ray actor %d could not start: %s", number, exc)
            return False
        return True

    def _warn_starting(self, count: int) -> None:
        ray_settings = self.config.ray
        log.warning(
            "%d Ray actor(s) not started after %.0f s: does the cluster have %s CPU and %s "
            "GPU free for each? (the others go on)",
            count,
            STARTUP_WARNING_S,
            ray_settings.num_cpus,
            ray_settings.num_gpus,
        )

    def _fail_all(self, reason: str) -> Iterator[tuple[StudyTask, dict[str, Any]]]:
        for _, task in reversed(self._queue):
            yield task, {"state": "failed", "error": reason}
        self._queue = []

    def _entry(self, ref: Any, task: StudyTask) -> dict[str, Any] | None:
        """The study's manifest entry; None when its actor died and it is sent again."""
        study = task.study_instance_uid
        try:
            entry, node = ray.get(ref)
        except RayActorError as exc:
            attempt = self._attempts[study]
            if attempt >= self.config.jobs.max_attempts:
                return self._lost(task, attempt, exc)
            delay = self.config.jobs.delay(attempt)
            log.warning(
                "study %s (%s): its Ray worker died (%s); sent again in %.0f s",
                study,
                task.input_folder,
                type(exc).__name__,
                delay,
            )
            self._queue.append((time.monotonic() + delay, task))
            self._queue.sort(key=lambda item: -item[0])
            return None
        except (RayTaskError, RayError) as exc:
            log.error("study %s (%s) failed on Ray: %s", study, task.input_folder, exc)
            return {"state": "failed", "error": f"unexpected {type(exc).__name__}: {exc}"}
        self.placement[study] = node
        log.info("study %s: processed on node %s", study, node)
        return dict(entry)

    def _lost(self, task: StudyTask, attempts: int, exc: RayActorError) -> dict[str, Any]:
        log.error(
            "study %s (%s): its Ray worker died: %s",
            task.study_instance_uid,
            task.input_folder,
            exc,
        )
        reason = f"the Ray worker died while processing it, {attempts} time(s)"
        return {"state": "failed", "error": f"{reason}: {type(exc).__name__}"}

    def stats(self) -> list[dict[str, Any]]:
        """Each actor's node, process and memory (:func:`worker_stats`)."""
        return list(ray.get([a.stats.remote() for a in self.actors]))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._disconnect:
            ray.shutdown()
