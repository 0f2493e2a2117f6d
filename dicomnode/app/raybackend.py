"""Batch conversion on a Ray cluster: the only module, with :mod:`dicomnode.app.rayjobs`,
that imports Ray (the ``ray`` extra); nothing imports it unless Ray is asked for.

The input is listed and its headers read by Ray tasks, one per top-level folder of the
input (files directly in it: chunks of :data:`SCAN_CHUNK`), spread over the cluster; the
driver merges and groups them exactly as :func:`dicomnode.routing.select.scan_folder`
does, so the studies, their series and the order of their files are the same.

Each study is then processed by one of ``[ray].actors`` actors (:class:`StudyWorker`),
each holding a study processor whose model sessions are loaded once, when the actor
starts, and reserving ``[ray].num_cpus`` / ``num_gpus`` / ``memory_mb`` of the cluster.
An actor reads the study's files and writes its results under the output folder itself:
input and output folders must be the same paths on every node (shared storage,
docs/scale-out.md).  Actors are restarted when they die (``max_restarts = -1``, on any node
with room), and a study in hand when its node died is run again, at most
``[jobs].max_attempts`` times in all (Ray's ``max_task_retries``); after that it is
reported failed and the batch goes on.  Results are deterministic (UIDs from seeds), so a
study run twice writes the same files.
"""

from __future__ import annotations

import logging
import os
import resource
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
from pydicom import dcmread
from ray.exceptions import RayActorError, RayError, RayTaskError

from dicomnode.app.batch import StudyTask, process_study
from dicomnode.app.processor import Processor
from dicomnode.config import Config, RaySettings

log = logging.getLogger(__name__)

#: Files of one header-reading task when they lie directly in the input folder.
SCAN_CHUNK = 512
#: Actor calls in flight per actor (the next study is waiting when one finishes).
IN_FLIGHT = 2


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (``""``: start a local Ray instance, ``auto``:
    the cluster of this machine); returns whether this call connected (and so should
    disconnect)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(include_dashboard=False, **options)
    return True


def actor_options(settings: RaySettings) -> dict[str, Any]:
    """What each actor reserves on the cluster, and its restart policy."""
    options: dict[str, Any] = {
        "num_cpus": settings.num_cpus,
        "num_gpus": settings.num_gpus,
        "max_restarts": -1,
        "scheduling_strategy": "SPREAD",
    }
    if settings.memory_mb:
        options["memory"] = settings.memory_mb * 2**20
    return options


def worker_stats() -> dict[str, Any]:
    """Where this process runs and its memory: peak and current resident set (MiB)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return {
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
        "pid": os.getpid(),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mb": resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20,
    }


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
        self.retries = max(0, config.jobs.max_attempts - 1)
        self._disconnect = connect(address)
        self.actors: list[Any] = []
        #: Study -> the node id it was processed on.
        self.placement: dict[str, str] = {}

    def scan(self, input_dir: Path) -> dict[str, dict[str, list[Path]]]:
        return scan_on_cluster(input_dir)

    def _start_actors(self) -> None:
        if not self.actors:
            options = actor_options(self.config.ray)
            self.actors = [
                StudyActor.options(**options).remote(self.config, str(self.output_dir))
                for _ in range(self.config.ray.actors)
            ]

    def run(self, tasks: Sequence[StudyTask]) -> Iterator[tuple[StudyTask, dict[str, Any]]]:
        if not tasks:
            return
        self._start_actors()
        queue = list(reversed(tasks))
        busy = dict.fromkeys(range(len(self.actors)), 0)
        running: dict[Any, tuple[StudyTask, int]] = {}
        while queue or running:
            for number in sorted(busy, key=busy.__getitem__):
                if queue and busy[number] < IN_FLIGHT:
                    task = queue.pop()
                    call = self.actors[number].process.options(max_task_retries=self.retries)
                    running[call.remote(task)] = (task, number)
                    busy[number] += 1
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                task, number = running.pop(ref)
                busy[number] -= 1
                yield task, self._entry(ref, task)

    def _entry(self, ref: Any, task: StudyTask) -> dict[str, Any]:
        study = task.study_instance_uid
        try:
            entry, node = ray.get(ref)
        except RayActorError as exc:
            log.error("study %s (%s): its Ray worker died: %s", study, task.input_folder, exc)
            reason = f"the Ray worker died {self.retries + 1} time(s) while processing it"
            return {"state": "failed", "error": f"{reason}: {type(exc).__name__}"}
        except (RayTaskError, RayError) as exc:
            log.error("study %s (%s) failed on Ray: %s", study, task.input_folder, exc)
            return {"state": "failed", "error": f"unexpected {type(exc).__name__}: {exc}"}
        self.placement[study] = node
        log.info("study %s: processed on node %s", study, node)
        return dict(entry)

    def stats(self) -> list[dict[str, Any]]:
        """Each actor's node, process and memory (:func:`worker_stats`)."""
        return list(ray.get([a.stats.remote() for a in self.actors]))

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._disconnect:
            ray.shutdown()
