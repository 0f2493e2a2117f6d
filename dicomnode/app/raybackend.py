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
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
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
#: How often an actor that is restarting (its node died) is asked whether it answers.
RESTART_PROBE_S = 0.5


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

    def node_id(self) -> str:
        """The node this actor runs on (the driver's first call: it answers once started)."""
        return str(ray.get_runtime_context().get_node_id())

    def stats(self) -> dict[str, Any]:
        return worker_stats()


StudyActor = ray.remote(StudyWorker)


class _ActorPool:
    """The driver's view of its actors: which have answered (and on which node), the
    studies each has in hand, and the probes (``node_id`` calls) of those starting or
    restarting.  A restarting actor refuses calls (``ActorUnavailableError``): it is
    probed every :data:`RESTART_PROBE_S` until it answers, and gets no study before."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        #: Actors that answered -> the node each last ran on.
        self.ready: dict[int, str] = {}
        self.probes: dict[Any, int] = {a.node_id.remote(): n for n, a in enumerate(actors)}
        #: Restarting actors -> when to probe them again.
        self.recheck: dict[int, float] = {}
        self.running: dict[Any, tuple[StudyTask, int]] = {}

    def least_busy(self) -> int | None:
        """The actor that answered and holds the fewest studies, if fewer than
        :data:`IN_FLIGHT`."""
        held = dict.fromkeys(self.ready, 0)
        for _, number in self.running.values():
            if number in held:
                held[number] += 1
        free = [n for n in held if held[n] < IN_FLIGHT]
        return min(free, key=held.__getitem__, default=None)

    def send(self, number: int, task: StudyTask) -> None:
        self.running[self.actors[number].process.remote(task)] = (task, number)
        log.info(
            "study %s (%s): sent to actor %d on node %s",
            task.study_instance_uid,
            task.input_folder,
            number,
            self.ready[number],
        )

    def all_lost(self) -> bool:
        """No actor has answered, none is being probed: none could start."""
        return not self.ready and not self.probes and not self.recheck

    def wait(self, timeout: float) -> list[Any]:
        """The calls and probes done within ``timeout`` (at least 50 ms, at most until
        the next probe is due)."""
        if self.recheck:
            timeout = min(timeout, min(self.recheck.values()) - time.monotonic())
        done, _ = ray.wait([*self.running, *self.probes], num_returns=1, timeout=max(0.05, timeout))
        return list(done)

    def answered(self, ref: Any) -> None:
        """A probe came back: the actor is ready, restarting (probe again later) or could
        not start (logged; it gets nothing)."""
        number = self.probes.pop(ref)
        try:
            node = str(ray.get(ref))
        except RayActorError as exc:
            if isinstance(exc, ActorUnavailableError):
                self.recheck[number] = time.monotonic() + RESTART_PROBE_S
            else:
                log.error("Ray actor %d could not start: %s", number, exc)
            return
        except RayError as exc:
            log.error("Ray actor %d could not start: %s", number, exc)
            return
        log.info("Ray actor %d answers on node %s", number, node)
        self.ready[number] = node

    def restarting(self, number: int) -> None:
        """The actor's node or process died with a study in hand: Ray restarts it."""
        if self.ready.pop(number, None) is not None:
            log.info("Ray actor %d is restarting", number)
            self.recheck[number] = time.monotonic()

    def probe_restarted(self, now: float) -> None:
        for number, when in list(self.recheck.items()):
            if when <= now:
                del self.recheck[number]
                self.probes[self.actors[number].node_id.remote()] = number

    def ran_on(self, number: int, node: str) -> None:
        """Where the actor answered a call from (Ray may have restarted it elsewhere while
        it held nothing)."""
        if number in self.ready:
            self.ready[number] = node


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
        """Send each study to an actor that has answered (at most :data:`IN_FLIGHT` each);
        a study whose actor died is sent again after the back-off of ``[jobs]``, and that
        actor gets nothing more until it answers again from where Ray restarted it."""
        if not tasks:
            return
        self._start_actors()
        #: (when it may be sent, the study), the next one last.
        self._queue = [(0.0, task) for task in reversed(tasks)]
        self._attempts = {}
        pool = _ActorPool(self.actors)
        since = time.monotonic()
        while self._queue or pool.running:
            now = time.monotonic()
            pool.probe_restarted(now)
            while self._queue and self._queue[-1][0] <= now:
                number = pool.least_busy()
                if number is None:
                    break
                _, task = self._queue.pop()
                study = task.study_instance_uid
                self._attempts[study] = self._attempts.get(study, 0) + 1
                pool.send(number, task)
            if pool.all_lost():
                yield from self._fail_all("no Ray actor could start (see the log)")
                return
            if pool.ready:
                since = time.monotonic()
            elif time.monotonic() - since > STARTUP_WARNING_S:
                self._warn_starting(len(self.actors))
                since = float("inf")
            done = pool.wait(self._queue[-1][0] - now if self._queue else 1.0)
            for ref in done:
                if ref in pool.probes:
                    pool.answered(ref)
                    continue
                task, number = pool.running.pop(ref)
                try:
                    entry, node = ray.get(ref)
                except RayActorError as exc:
                    pool.restarting(number)
                    lost = self._died(task, exc)
                    if lost is not None:
                        yield task, lost
                    continue
                except RayError as exc:
                    log.error(
                        "study %s (%s) failed on Ray: %s",
                        task.study_instance_uid,
                        task.input_folder,
                        exc,
                    )
                    yield (
                        task,
                        {"state": "failed", "error": f"unexpected {type(exc).__name__}: {exc}"},
                    )
                    continue
                pool.ran_on(number, node)
                self.placement[task.study_instance_uid] = node
                log.info("study %s: processed on node %s", task.study_instance_uid, node)
                yield task, dict(entry)

    def _warn_starting(self, count: int) -> None:
        ray_settings = self.config.ray
        log.warning(
            "no Ray actor (of %d) has answered for %.0f s: does the cluster have %s CPU and "
            "%s GPU free for each?",
            count,
            STARTUP_WARNING_S,
            ray_settings.num_cpus,
            ray_settings.num_gpus,
        )

    def _fail_all(self, reason: str) -> Iterator[tuple[StudyTask, dict[str, Any]]]:
        for _, task in reversed(self._queue):
            yield task, {"state": "failed", "error": reason}
        self._queue = []

    def _died(self, task: StudyTask, exc: RayActorError) -> dict[str, Any] | None:
        """The study's actor died: None when it is sent again after the back-off, its
        manifest entry (failed) after ``[jobs].max_attempts``."""
        study = task.study_instance_uid
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
