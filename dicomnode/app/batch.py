"""Batch conversion: a folder tree of DICOM in, SEG + SR per study out, and a manifest.

Uses the node's own routing and :class:`~dicomnode.app.processor.Processor`, so results are
the same objects the node would send.  Results go to ``OUT/<study>/`` (names from
:mod:`dicomnode.outputs.layout`); ``OUT/manifest.json`` and ``OUT/manifest.csv`` map each
input folder to its study, output files (with their SHA-256), findings and priority.

Resume: a study the manifest lists as done is skipped when each of its output files is
present and unchanged (same hash); otherwise it is done again.  The manifest is written
as studies finish (after each one, unless the last write was under a second ago or the
manifest has grown so large that writing it would cost more than about 5% of the run),
at the end, and when the run is interrupted, so an interrupted run resumes where it
stopped; a study finished but not yet on record is done again, into the same files.  A
missing input folder is an error; non-DICOM files are skipped with a warning.

Where the studies run is a :class:`StudyRunner`: one after another in this process (the
default), a pool of local processes (``workers``), or actors on a Ray cluster
(:mod:`dicomnode.app.raybackend`, ``ray``).  Every runner processes a study with
:func:`process_study`, so the files are the same; the manifest is written here, in study
order, whatever order the studies finish in.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dicomnode.app.processor import Processor
from dicomnode.config import Config
from dicomnode.errors import DicomNodeError, MissingExtraError
from dicomnode.fsutil import write_bytes_atomically
from dicomnode.outputs.layout import result_files
from dicomnode.routing.select import match_routes, scan_folder, series_infos

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
#: The least time between two writes of the manifest during a run.
MANIFEST_INTERVAL_S = 1.0
CSV_COLUMNS = (
    "input_folder",
    "study_instance_uid",
    "state",
    "route",
    "series_instance_uid",
    "segmentation",
    "report",
    "findings",
    "classifications",
    "priority",
    "error",
)


class BatchError(DicomNodeError):
    """The batch cannot run (its input folder is missing)."""


@dataclass
class BatchSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: Studies done again: an output file was missing or changed since the last run.
    redone: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    #: Study -> where it was processed (a Ray node id; empty for local runs).
    placement: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    manifest_json: Path = Path()
    manifest_csv: Path = Path()

    @property
    def ok(self) -> bool:
        return not self.failed


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _input_folder(paths: Iterable[Path], root: Path) -> str:
    """The study's folder relative to the input root (the deepest folder holding it all)."""
    common = os.path.commonpath([str(p.parent) for p in paths])
    relative = os.path.relpath(common, root)
    return "." if relative == "." else relative


def _unchanged(entry: dict[str, Any], output_dir: Path) -> bool:
    """Every output file of a done study is present with the hash the manifest recorded."""
    for output in entry.get("outputs", []):
        path = output_dir / output["file"]
        if not path.is_file() or sha256_of(path) != output["sha256"]:
            return False
    return entry.get("state") == "done" and bool(entry.get("outputs"))


class _RateColumn(ProgressColumn):
    """Studies per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} studies/s" if speed else "- studies/s")


def _progress(stream: TextIO, input_dir: Path, enabled: bool) -> Progress:
    return Progress(
        TextColumn(f"[bold]{input_dir}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[study]}"),
        console=Console(file=stream, width=None if stream.isatty() else 200),
        disable=not enabled,
        transient=False,
    )


@dataclass(frozen=True)
class StudyTask:
    """One study of the input: its series' files (absolute paths) and its input folder."""

    study_instance_uid: str
    series: dict[str, list[Path]]
    input_folder: str
    #: The creation time written into every output (None: the clock's), so that two runs
    #: over the same input give the same bytes.
    created: datetime.datetime | None = None


def process_study(
    config: Config, processor: Processor, task: StudyTask, output_dir: Path
) -> dict[str, Any]:
    """Route and process one study into ``output_dir/<study>/``; its manifest entry
    (without its input folder).  An error is the entry of a failed study, not raised:
    one broken study must not stop the batch."""
    study_uid = task.study_instance_uid
    try:
        return _process_study(
            config,
            processor,
            study_uid,
            task.series,
            output_dir / study_uid,
            output_dir,
            task.created,
        )
    except DicomNodeError as exc:
        log.error("study %s (%s) failed: %s", study_uid, task.input_folder, exc)
        return {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        log.exception("study %s (%s) crashed", study_uid, task.input_folder)
        return {"state": "failed", "error": f"unexpected {type(exc).__name__}: {exc}"}


def _process_study(
    config: Config,
    processor: Processor,
    study_uid: str,
    series: dict[str, list[Path]],
    study_out: Path,
    output_dir: Path,
    created: datetime.datetime | None = None,
) -> dict[str, Any]:
    """Route and process one study; the manifest entry (without its input folder)."""
    infos = series_infos((uid, p) for uid, paths in series.items() for p in paths)
    matches = match_routes(config.routes, infos)
    if not matches:
        log.info("study %s: no route matched; ignored", study_uid)
        return {"state": "ignored", "outputs": [], "results": []}
    results, outputs = [], []
    for m in matches:
        for series_uid in m.series_uids:
            out = processor.process_series(
                series[series_uid],
                m.pipeline,
                result_files(study_out, series_uid, m.route),
                uid_seed=f"batch/{study_uid}/{m.route}/{series_uid}",
                created=created,
            )
            results.append(
                {
                    "route": m.route,
                    **out.summary,
                    "seg": out.segmentation.name if out.segmentation else None,
                    "sr": out.report.name,
                }
            )
            outputs += [
                {"file": p.relative_to(output_dir).as_posix(), "sha256": sha256_of(p)}
                for p in out.files
            ]
    document = json.dumps({"results": results}, indent=2).encode()
    write_bytes_atomically(study_out / RESULT_FILE, document)
    return {"state": "done", "outputs": outputs, "results": results}


def _csv_rows(studies: dict[str, dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for uid, entry in studies.items():
        base = {
            "input_folder": entry.get("input_folder", ""),
            "study_instance_uid": uid,
            "state": entry.get("state", ""),
            "error": entry.get("error", ""),
        }
        if not entry.get("results"):
            yield base
        for r in entry.get("results", []):
            yield {
                **base,
                "route": r.get("route", ""),
                "series_instance_uid": r.get("series", ""),
                "segmentation": r.get("seg") or "",
                "report": r.get("sr") or "",
                "findings": len(r.get("findings", [])),
                "classifications": "; ".join(
                    f"{c['label']} {c['probability']:.3f}" for c in r.get("classifications", [])
                ),
                "priority": r.get("priority") or "",
            }


def write_manifest(output_dir: Path, studies: dict[str, dict[str, Any]]) -> tuple[Path, Path]:
    """``manifest.json`` (the resume record) and ``manifest.csv`` (one row per result)."""
    studies = dict(sorted(studies.items()))  # the same bytes whatever order studies finish in
    as_json = output_dir / MANIFEST_JSON
    write_bytes_atomically(as_json, json.dumps({"studies": studies}, indent=2).encode())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_rows(studies))
    as_csv = output_dir / MANIFEST_CSV
    write_bytes_atomically(as_csv, buffer.getvalue().encode())
    return as_json, as_csv


def _read_manifest(output_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        studies = json.loads((output_dir / MANIFEST_JSON).read_text())["studies"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return studies if isinstance(studies, dict) else {}


class StudyRunner(Protocol):
    """Runs studies somewhere; yields each with its manifest entry as it finishes."""

    #: Study -> where it was processed (empty when it says nothing useful).
    placement: dict[str, str]

    def scan(self, input_dir: Path) -> dict[str, dict[str, list[Path]]]:
        """The input's DICOM files grouped as study -> series -> paths (headers only)."""
        ...

    def run(self, tasks: Sequence[StudyTask]) -> Iterator[tuple[StudyTask, dict[str, Any]]]: ...

    def close(self) -> None: ...


class SerialRunner:
    """One study after another in this process (the study processor loaded once)."""

    def __init__(self, config: Config, output_dir: Path) -> None:
        self.config = config
        self.output_dir = output_dir
        self.processor = Processor(config)
        self.placement: dict[str, str] = {}

    def scan(self, input_dir: Path) -> dict[str, dict[str, list[Path]]]:
        return scan_folder(input_dir)

    def run(self, tasks: Sequence[StudyTask]) -> Iterator[tuple[StudyTask, dict[str, Any]]]:
        for task in tasks:
            yield task, process_study(self.config, self.processor, task, self.output_dir)

    def close(self) -> None:
        pass


class _PoolWorker:
    """The study processor of one pool process (built by the pool's initializer)."""

    processor: Processor | None = None


def _init_pool_worker(config: Config) -> None:
    _PoolWorker.processor = Processor(config)


def _process_in_pool(config: Config, task: StudyTask, output_dir: Path) -> dict[str, Any]:
    assert _PoolWorker.processor is not None, "the pool's initializer did not run"
    return process_study(config, _PoolWorker.processor, task, output_dir)


class PoolRunner:
    """``workers`` local processes, each with its own study processor (models loaded
    once per process); each process takes the next study when it is free."""

    def __init__(self, config: Config, output_dir: Path, workers: int) -> None:
        self.config = config
        self.output_dir = output_dir
        self.workers = workers
        self.placement: dict[str, str] = {}
        self.pool = ProcessPoolExecutor(
            workers, mp.get_context("spawn"), initializer=_init_pool_worker, initargs=(config,)
        )

    def scan(self, input_dir: Path) -> dict[str, dict[str, list[Path]]]:
        return scan_folder(input_dir)

    def run(self, tasks: Sequence[StudyTask]) -> Iterator[tuple[StudyTask, dict[str, Any]]]:
        queue = list(reversed(tasks))
        running: dict[Future[dict[str, Any]], StudyTask] = {}
        while queue or running:
            while queue and len(running) < 2 * self.workers:
                task = queue.pop()
                future = self.pool.submit(_process_in_pool, self.config, task, self.output_dir)
                running[future] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                try:
                    entry = future.result()
                except Exception as exc:  # the process died (BrokenProcessPool): no more
                    entry = {"state": "failed", "error": f"unexpected {type(exc).__name__}: {exc}"}
                yield task, entry

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def ray_runner(config: Config, output_dir: Path, address: str | None) -> StudyRunner:
    """Studies on the Ray cluster at ``address`` (None: ``[ray].address``)."""
    try:
        from dicomnode.app.raybackend import RayStudyRunner
    except ImportError as exc:
        if exc.name != "ray":
            raise
        raise MissingExtraError("batch conversion on Ray (--ray)", "ray") from None
    return RayStudyRunner(config, output_dir, config.ray.address if address is None else address)


def _tasks(
    studies: dict[str, dict[str, list[Path]]],
    input_dir: Path,
    created: datetime.datetime | None = None,
) -> list[StudyTask]:
    return [
        StudyTask(
            uid,
            series,
            _input_folder((p for paths in series.values() for p in paths), input_dir),
            created,
        )
        for uid, series in sorted(studies.items())
    ]


def run_batch(
    config: Config,
    input_dir: Path,
    output_dir: Path,
    stream: TextIO = sys.stderr,
    *,
    progress: bool = True,
    workers: int = 1,
    ray: bool = False,
    ray_address: str | None = None,
    runner: StudyRunner | None = None,
    created: datetime.datetime | None = None,
) -> BatchSummary:
    """Convert every study under ``input_dir`` into ``output_dir``.

    ``created`` is the creation time written into every output (Instance Creation and
    Content Date/Time); with it, the outputs of two runs over the same input are the same
    bytes (UIDs are derived from the input already).  Without it they are the clock's.

    ``workers`` > 1 runs studies in that many local processes; ``ray`` runs them on a Ray
    cluster (``ray_address``, else ``[ray].address``; its actors from ``[ray]``), where the
    input is also scanned (headers only) in parallel.  A ``runner`` given is used instead
    (and left open: its caller closes it)."""
    if not input_dir.is_dir():
        raise BatchError(f"input folder {input_dir} does not exist or is not a folder")
    started = time.perf_counter()
    input_dir, output_dir = input_dir.resolve(), output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if runner is not None:
        return _run(runner, input_dir, output_dir, stream, progress, started, created)
    chosen: StudyRunner
    if ray:
        chosen = ray_runner(config, output_dir, ray_address)
    elif workers > 1:
        chosen = PoolRunner(config, output_dir, workers)
    else:
        chosen = SerialRunner(config, output_dir)
    try:
        return _run(chosen, input_dir, output_dir, stream, progress, started, created)
    finally:
        chosen.close()


class _ManifestWriter:
    """Writes the manifest after a study when the last write is old enough: at least
    :data:`MANIFEST_INTERVAL_S` ago and 20 times as long ago as that write took, so that a
    large manifest (about 1 KB per study) costs at most about 5% of the run."""

    def __init__(self, output_dir: Path, manifest: dict[str, dict[str, Any]]) -> None:
        self.output_dir = output_dir
        self.manifest = manifest
        self.written_at = 0.0
        self.took = 0.0

    def write(self, summary: BatchSummary, *, now: bool = False) -> None:
        started = time.perf_counter()
        if not now and started - self.written_at < max(MANIFEST_INTERVAL_S, 20 * self.took):
            return
        summary.manifest_json, summary.manifest_csv = write_manifest(self.output_dir, self.manifest)
        self.written_at = time.perf_counter()
        self.took = self.written_at - started


def _run(
    runner: StudyRunner,
    input_dir: Path,
    output_dir: Path,
    stream: TextIO,
    progress: bool,
    started: float,
    created: datetime.datetime | None = None,
) -> BatchSummary:
    tasks = _tasks(runner.scan(input_dir), input_dir, created)
    summary = BatchSummary()
    manifest = _read_manifest(output_dir)
    writer = _ManifestWriter(output_dir, manifest)
    with _progress(stream, input_dir, progress) as bar:
        bar_task = bar.add_task("studies", total=len(tasks), study="")
        to_do = []
        for task in tasks:
            earlier = manifest.get(task.study_instance_uid)
            if earlier is not None and _unchanged(earlier, output_dir):
                summary.skipped.append(task.study_instance_uid)
                bar.advance(bar_task)
            else:
                to_do.append(task)
        try:
            for task, entry in runner.run(to_do):
                _record(summary, manifest, task, entry)
                writer.write(summary)
                bar.update(bar_task, advance=1, study=task.input_folder)
        finally:  # interrupted too: what is done is on record
            writer.write(summary, now=True)
    summary.placement = dict(runner.placement)
    summary.seconds = time.perf_counter() - started
    return summary


def _record(
    summary: BatchSummary,
    manifest: dict[str, dict[str, Any]],
    task: StudyTask,
    entry: dict[str, Any],
) -> None:
    study_uid, folder = task.study_instance_uid, task.input_folder
    earlier = manifest.get(study_uid)
    if entry["state"] == "done":
        if earlier is not None and earlier.get("state") == "done":
            summary.redone.append(study_uid)
            log.warning("study %s (%s): outputs missing or changed; redone", study_uid, folder)
        else:
            summary.done.append(study_uid)
    elif entry["state"] == "ignored":
        summary.ignored.append(study_uid)
    else:
        summary.failed[study_uid] = entry["error"]
    manifest[study_uid] = {"input_folder": folder, **entry}
