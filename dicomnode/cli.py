"""``dicomnode`` command line: the only place that configures logging or exits.

Every error ends in one line on stderr (``error: ...``) and a non-zero exit status:
2 for errors of the configuration, the input or the request, 1 when work failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dicomnode.config import Config, default_config_path, load_config
from dicomnode.errors import ConfigError, DicomNodeError

DESCRIPTION = """\
A DICOM node: receives studies from a PACS (C-STORE), runs the configured models on them
and sends DICOM SEG and SR results back.  Start it with `dicomnode serve --config FILE`;
check a configuration with `dicomnode check-config FILE`; follow its work with
`dicomnode jobs`; try everything on this machine with `dicomnode demo`."""

EPILOG = "Run `dicomnode COMMAND --help` for a command's options."


class CommandError(DicomNodeError):
    """A request the command cannot carry out (unknown job, missing folder, ...)."""


def _package_version() -> str:
    try:
        return version("dicomnode")
    except PackageNotFoundError:
        return "unknown"


def _setup_logging(level: str, fmt: str = "text") -> None:
    from dicomnode.app.logformat import configure_logging

    configure_logging(level, "json" if fmt == "json" else "text")


def _config(args: argparse.Namespace) -> Config:
    path = Path(args.config) if getattr(args, "config", None) else default_config_path()
    overrides = {}
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    return load_config(path, overrides)


def _local(epoch: float | None) -> str:
    return "" if not epoch else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _iso(epoch: float | None) -> str | None:
    if not epoch:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(epoch))


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# --- serve, check-config, demo, batch ------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.app.node import Node

    config = _config(args)
    _setup_logging(config.node.log_level, args.log_format)
    node = Node(config, log_format=args.log_format)
    try:
        node.serve_forever()
    except OSError as exc:  # a port in use, an address not on this machine
        try:
            node.scp.port  # noqa: B018 (the DICOM port was bound: the HTTP one failed)
        except RuntimeError:
            pass
        else:
            node.stop(timeout=10)
        where = f"{config.node.bind_address}:{config.node.port}"
        if config.http.enabled:
            where += f" (HTTP {config.http.bind_address}:{config.http.port})"
        raise CommandError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from dicomnode.app.preflight import preflight

    config = _config(args)
    report = preflight(config)
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(
        f"{config.source}: OK ({len(config.routes)} route(s), {len(config.pipelines)} "
        f"pipeline(s), {len(config.remotes)} remote(s))"
    )
    for p in config.pipelines:
        bundles = ", ".join(
            f"{role} {b.card.name} {b.card.version}" for role, b in report.bundles[p.name].items()
        )
        print(f"  pipeline {p.name!r}: kind {p.kind!r}" + (f"; {bundles}" if bundles else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dicomnode.app.demo import run_demo

    _setup_logging("WARNING" if not args.verbose else "INFO")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dicomnode-demo-"))
    ok = run_demo(
        work,
        sys.stdout,
        slices=args.slices,
        size=args.size,
        seed=args.seed,
        log_level="INFO" if args.verbose else "WARNING",
    )
    print("demo " + ("succeeded" if ok else "FAILED") + f"; everything is in {work}")
    return 0 if ok else 1


def _timestamp(text: str) -> datetime.datetime:
    """An ISO 8601 time (local time when it has no zone) or seconds since 1970 (UTC)."""
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.datetime.fromtimestamp(float(text), datetime.UTC)
        return datetime.datetime.fromisoformat(text)
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} ({exc})") from exc


def _source_date_epoch() -> datetime.datetime | None:
    """``SOURCE_DATE_EPOCH`` (reproducible-builds.org): the time to write instead of now."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return None
    try:
        return _timestamp(value)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"SOURCE_DATE_EPOCH: {exc}") from exc


def cmd_batch(args: argparse.Namespace) -> int:
    import dataclasses

    from dicomnode.app.batch import run_batch

    config = _config(args)
    if args.actors is not None:
        config = dataclasses.replace(
            config, ray=dataclasses.replace(config.ray, actors=args.actors)
        )
    _setup_logging("WARNING" if not args.verbose else "INFO")
    s = run_batch(
        config,
        Path(args.input),
        Path(args.output),
        progress=not args.no_progress,
        workers=args.workers,
        ray=args.ray is not None,
        ray_address=args.ray or None,
        created=args.created_at or _source_date_epoch(),
    )
    print(
        f"{len(s.done)} done, {len(s.skipped)} skipped (already done), "
        f"{len(s.redone)} redone (outputs missing or changed), "
        f"{len(s.ignored)} ignored (no route), {len(s.failed)} failed in {s.seconds:.1f} s"
    )
    print(f"manifest: {s.manifest_csv} and {s.manifest_json}")
    for study, reason in s.failed.items():
        print(f"  FAILED {study}: {reason}")
    return 0 if s.ok else 1


# --- jobs ----------------------------------------------------------------------------


def _job_document(job: Any, items: Sequence[Any] | None = None) -> dict[str, Any]:
    end = job.finished_at or (time.time() if job.state in ("running", "sending") else None)
    document: dict[str, Any] = {
        "id": job.id,
        "state": str(job.state),
        "route": job.route,
        "study_instance_uid": job.study_instance_uid,
        "generation": job.generation,
        "series_uids": list(job.series_uids),
        "destinations": list(job.destinations),
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "finished_at": _iso(job.finished_at),
        "duration_s": round(end - job.created_at, 3) if end else None,
        "next_attempt_at": _iso(job.next_attempt_at) if job.state == "queued" else None,
        "last_error": job.last_error,
        "triage_priority": getattr(job, "triage_priority", ""),
        "summary": json.loads(job.summary) if job.summary else None,
    }
    if items is not None:
        document["outbox"] = [
            {
                "id": i.id,
                "destination": i.destination,
                "file": i.path.name,
                "state": str(i.state),
                "attempts": i.attempts,
                "status": None if i.status is None else f"0x{i.status:04X}",
                "next_attempt_at": _iso(i.next_attempt_at) if i.state == "pending" else None,
                "last_error": i.last_error,
            }
            for i in items
        ]
    return document


def _get_job(ctx: Any, job_id: int) -> Any:
    try:
        return ctx.jobs.get(job_id)
    except KeyError:
        raise CommandError(f"no job {job_id} (see `dicomnode jobs list`)") from None


def _jobs_list(ctx: Any, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    jobs = ctx.jobs.list_jobs(state=args.state, limit=args.limit)
    counts, outbox, studies = ctx.jobs.counts(), ctx.outbox.counts(), ctx.index.study_counts()
    if args.json:
        print(
            json.dumps(
                {
                    "jobs": [_job_document(j) for j in jobs],
                    "counts": {"jobs": counts, "outbox": outbox, "studies": studies},
                },
                indent=2,
            )
        )
        return 0
    console = Console(width=max(160, Console().width))
    table = Table(title=f"jobs ({args.state or 'all states'})", title_justify="left")
    for column in ("id", "state", "route", "study", "att", "created", "took", "error"):
        table.add_column(column, justify="right" if column in ("id", "att") else "left")
    for j in jobs:
        doc = _job_document(j)
        table.add_row(
            str(j.id),
            str(j.state),
            j.route,
            "…" + j.study_instance_uid[-12:],
            str(j.attempts),
            _local(j.created_at),
            _duration(doc["duration_s"]),
            j.last_error[:60],
        )
    console.print(table)

    def line(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"

    console.print(f"jobs: {line(counts)}; outbox: {line(outbox)}; studies: {line(studies)}")
    if studies.get("receiving"):
        console.print(
            f"{studies['receiving']} study(ies) still receiving: a study becomes jobs once "
            f"no instance of it has arrived for the quiet period "
            f"({ctx.config.completeness.quiet_period_s:g} s)"
        )
    return 0


def _jobs_show(ctx: Any, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if not args.ids:
        raise CommandError("jobs show needs one or more job ids, e.g. `dicomnode jobs show 12`")
    jobs = [_get_job(ctx, job_id) for job_id in args.ids]
    documents = [_job_document(job, ctx.outbox.items(job.id)) for job in jobs]
    if args.json:
        print(json.dumps(documents if len(documents) > 1 else documents[0], indent=2))
        return 0
    console = Console(width=max(160, Console().width))
    for job, doc in zip(jobs, documents, strict=True):
        fields = Table(title=f"job {job.id}", show_header=False, title_justify="left")
        fields.add_column("field", style="bold")
        fields.add_column("value")
        rows = [
            ("state", str(job.state)),
            ("route", job.route),
            ("study", job.study_instance_uid),
            ("generation", str(job.generation)),
            ("series", ", ".join(job.series_uids)),
            ("destinations", ", ".join(job.destinations)),
            ("attempts", str(job.attempts)),
            ("created", _local(job.created_at)),
            ("updated", _local(job.updated_at)),
            ("finished", _local(job.finished_at)),
            ("took", _duration(doc["duration_s"])),
            ("next attempt", _local(job.next_attempt_at) if job.state == "queued" else ""),
            ("priority", doc["triage_priority"]),
            ("error", job.last_error),
        ]
        for name, value in rows:
            if value:
                fields.add_row(name, value)
        for series in (doc["summary"] or {}).get("series", []):
            findings = len(series.get("findings", []))
            fields.add_row("result", f"series {series.get('series')}: {findings} finding(s)")
        console.print(fields)
        items = Table(title="outbox", title_justify="left")
        for column in ("id", "destination", "file", "state", "att", "status", "error"):
            items.add_column(column)
        for item in doc["outbox"]:
            items.add_row(
                str(item["id"]),
                item["destination"],
                item["file"],
                item["state"],
                str(item["attempts"]),
                item["status"] or "",
                item["last_error"][:80],
            )
        console.print(items)
    return 0


def _jobs_retry(ctx: Any, args: argparse.Namespace) -> int:
    if not args.ids:
        raise CommandError("jobs retry needs one or more job ids, e.g. `dicomnode jobs retry 12`")
    for job_id in args.ids:
        _get_job(ctx, job_id)
        state = ctx.outbox.retry_job(job_id, force=args.force)
        what = "results will be sent again" if state == "sending" else "queued to run again"
        print(f"job {job_id}: {what} ({state})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicomnode.app.worker import WorkerContext

    config = _config(args)
    if not config.node.data_dir.is_dir():
        raise CommandError(f"no data directory {config.node.data_dir}: has the node run yet?")
    ctx = WorkerContext.open(config)
    action = {"list": _jobs_list, "show": _jobs_show, "retry": _jobs_retry}[args.action]
    return action(ctx, args)


# --- feedback --------------------------------------------------------------------------


def _feedback_document(r: Any) -> dict[str, Any]:
    corrects = r.provenance.get("corrects", {})
    creator = r.provenance.get("creator", {})
    return {
        "id": r.id,
        "state": str(r.state),
        "received_at": _iso(r.received_at),
        "calling_ae": r.calling_ae,
        "calling_host": r.calling_host,
        "study_instance_uid": r.study_instance_uid,
        "sop_instance_uid": r.sop_instance_uid,
        "corrects": corrects,
        "creator": creator,
        "path": r.path,
        "reason": r.reason,
    }


def cmd_feedback(args: argparse.Namespace) -> int:
    """What came back: corrected segmentations (settled first: accepted as training data
    with their provenance, or rejected with the reason)."""
    from rich.console import Console
    from rich.table import Table

    from dicomnode.db import Database
    from dicomnode.feedback.collect import FeedbackCollector
    from dicomnode.jobs.store import JobStore

    config = _config(args)
    if not config.node.data_dir.is_dir():
        raise CommandError(f"no data directory {config.node.data_dir}: has the node run yet?")
    db = Database(config.node.data_dir)
    collector = FeedbackCollector(db, JobStore(db, config.jobs))
    collector.collect()
    records = collector.inbox.records(args.state, limit=args.limit, newest=True)
    if args.json:
        print(json.dumps({"feedback": [_feedback_document(r) for r in records]}, indent=2))
        return 0
    console = Console(width=max(160, Console().width))
    table = Table(title=f"feedback ({args.state or 'all states'})", title_justify="left")
    for column in ("id", "state", "received", "from", "study", "corrects", "made by"):
        table.add_column(column, justify="right" if column == "id" else "left")
    table.add_column("kept as (in the data directory) / why not", overflow="fold")
    for r in records:
        corrects = r.provenance.get("corrects", {})
        creator = r.provenance.get("creator", {})
        made_by = " ".join(
            str(v)
            for v in (creator.get("manufacturer"), creator.get("manufacturer_model_name"))
            if v
        )
        table.add_row(
            str(r.id),
            str(r.state),
            _local(r.received_at),
            f"{r.calling_ae}@{r.calling_host}",
            "…" + r.study_instance_uid[-12:],
            (
                f"job {corrects['job_id']}: {corrects.get('model', '')} "
                f"{corrects.get('model_version', '')}"
                if corrects
                else ""
            ),
            made_by,
            r.path or r.reason[:60],
        )
    console.print(table)
    counts = collector.inbox.counts()
    console.print(
        "feedback: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")
    )
    return 0


# --- route, schema, phantom ------------------------------------------------------------


def _describe_stack(paths: Sequence[Path]) -> str:
    """Which images of a series the node would process (or why it cannot)."""
    from dicomnode.imaging.series import select_stack

    try:
        choice = select_stack(paths)
    except DicomNodeError as exc:
        return f"cannot be processed: {exc}"
    return choice.note or f"processed: one consistent stack of {len(choice.paths)} instance(s)"


def cmd_route(args: argparse.Namespace) -> int:
    from dicomnode.routing.select import explain, scan_folder, series_infos

    config = _config(args)
    if not Path(args.study_dir).is_dir():
        raise CommandError(f"study folder {args.study_dir} does not exist")
    studies = scan_folder(Path(args.study_dir))
    if not studies:
        raise CommandError(f"no DICOM files under {args.study_dir}")
    for study, series in studies.items():
        print(f"study {study}: {len(series)} series")
        infos = series_infos((uid, p) for uid, paths in series.items() for p in paths)
        matched = False
        for e in explain(config.routes, infos):
            verdict = "MATCH" if e.verdict.matched else "no match"
            matched |= e.verdict.matched
            print(
                f"  route {e.route!r} x series {e.series_uid} ({e.series_description!r}): {verdict}"
            )
            for reason in e.verdict.reasons:
                print(f"      {reason}")
            if e.verdict.matched:
                print(f"      {_describe_stack(series[e.series_uid])}")
        if not matched:
            print("  -> no route matches: the study would be recorded as ignored")
    return 0


def document_schemas() -> dict[str, dict[str, object]]:
    """The JSON Schemas of the documents dicomnode reads, by name (docs/<name>.schema.json)."""
    from dicomnode.config import config_schema
    from dicomnode.inference.card import card_schema
    from dicomnode.models.recipe import recipe_schema

    return {"config": config_schema(), "card": card_schema(), "recipe": recipe_schema()}


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(document_schemas()[args.document], indent=2, sort_keys=True))
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

    spec = PhantomSpec(
        rows=args.size,
        columns=args.size,
        slices=args.slices,
        orientation=args.orientation,
        seed=args.seed,
        n_lesions=args.lesions,
    )
    phantom = generate_phantom(spec)
    files = write_phantom(phantom, Path(args.out))
    print(f"wrote {len(files)} instances to {args.out}")
    for i, lesion in enumerate(phantom.lesions, 1):
        print(
            f"  lesion {i}: centre {tuple(round(c, 1) for c in lesion.center_mm)} mm, "
            f"radius {lesion.radius_mm:.1f} mm"
        )
    return 0


DELEGATED = {
    "train": "train a model from a recipe (needs the 'train' extra)",
    "evaluate": "evaluate a bundle (ONNX Runtime) or a checkpoint (needs 'train')",
    "export": "export a checkpoint to an ONNX bundle (needs the 'train' extra)",
    "synth": "write a synthetic training set: CT phantoms + DICOM SEG labels",
}


def _delegate(name: str, argv: Sequence[str]) -> int:
    from dicomnode.models import cli as train_cli

    entry = "synthetic_main" if name == "synth" else f"{name}_main"
    return int(getattr(train_cli, entry)(list(argv)) or 0)


def _job_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (a number)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (a number from 1)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1")
    return value


def _config_option(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--config",
        required=required,
        metavar="FILE",
        help="the node's configuration file (TOML)"
        + ("" if required else "; default: the embedded default configuration"),
    )


def build_parser() -> argparse.ArgumentParser:
    from dicomnode.jobs.store import JobState

    p = argparse.ArgumentParser(
        prog="dicomnode",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"dicomnode {_package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")

    s = command("serve", "run the node (C-ECHO/C-STORE SCP, jobs, delivery, HTTP port)")
    _config_option(s, required=True)
    s.add_argument("--port", type=int, help="DICOM port to listen on (overrides [node].port)")
    s.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines as text (default) or one JSON object per line",
    )
    s.set_defaults(func=cmd_serve)

    s = command("check-config", "validate a configuration file and its model bundles")
    s.add_argument("config", metavar="FILE", help="the configuration file (TOML) to check")
    s.set_defaults(func=cmd_check)

    s = command("demo", "run a node, a synthetic study and a PACS on this machine")
    s.add_argument("--out", metavar="DIR", help="work folder (default: a new temporary folder)")
    s.add_argument("--slices", type=int, default=64, help="slices of the phantom (default 64)")
    s.add_argument("--size", type=int, default=256, help="rows and columns (default 256)")
    s.add_argument("--seed", type=int, default=7, help="random seed of the phantom (default 7)")
    s.add_argument("-v", "--verbose", action="store_true", help="show the node's INFO log")
    s.set_defaults(func=cmd_demo)

    s = command("batch", "convert a folder of DICOM studies offline into SEG + SR files")
    s.add_argument("input", metavar="INPUT", help="folder of DICOM files (any layout)")
    s.add_argument("output", metavar="OUTPUT", help="folder for results, one per study")
    _config_option(s, required=False)
    s.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    s.add_argument("-v", "--verbose", action="store_true", help="show INFO log lines")
    s.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="local processes converting studies side by side (default 1: this process)",
    )
    s.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster: ADDRESS (HOST:PORT or auto), else [ray].address, else a "
        "local Ray instance (needs pip install 'dicomnode[ray]'; docs/scale-out.md)",
    )
    s.add_argument(
        "--actors", type=_positive, metavar="N", help="with --ray: actors (default [ray].actors)"
    )
    s.add_argument(
        "--created-at",
        type=_timestamp,
        metavar="TIME",
        help="creation time written into every output (ISO 8601, e.g. 2026-12-01T08:00:00, "
        "or seconds since 1970), so that two runs give the same bytes; default "
        "$SOURCE_DATE_EPOCH if set, else the clock",
    )
    s.set_defaults(func=cmd_batch)

    s = command("jobs", "list jobs, show one, or retry failed ones")
    s.add_argument(
        "action",
        nargs="?",
        choices=["list", "show", "retry"],
        default="list",
        help="list (default), show IDS, or retry IDS",
    )
    s.add_argument("ids", nargs="*", type=_job_id, metavar="ID", help="job ids (show, retry)")
    _config_option(s, required=True)
    s.add_argument(
        "--state", choices=[str(state) for state in JobState], help="list only jobs in this state"
    )
    s.add_argument("--limit", type=int, default=200, help="list at most this many (default 200)")
    s.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    s.add_argument(
        "--force",
        action="store_true",
        help="retry: run a done job again (its earlier delivery stays on record)",
    )
    s.set_defaults(func=cmd_jobs)

    s = command("feedback", "list the corrected segmentations sent back to the node")
    s.add_argument("action", nargs="?", choices=["list"], default="list", help="list (default)")
    _config_option(s, required=True)
    s.add_argument(
        "--state", choices=["received", "accepted", "rejected"], help="only those in this state"
    )
    s.add_argument("--limit", type=int, default=200, help="list at most this many (default 200)")
    s.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    s.set_defaults(func=cmd_feedback)

    s = command("route", "explain which route matches the studies in a folder")
    s.add_argument("action", choices=["explain"], help="explain: show each rule's verdict")
    s.add_argument("study_dir", metavar="FOLDER", help="folder of DICOM files")
    _config_option(s, required=False)
    s.set_defaults(func=cmd_route)

    s = command("schema", "print the JSON Schema of the configuration, a model card or a recipe")
    s.add_argument("document", choices=["config", "card", "recipe"], help="which document")
    s.set_defaults(func=cmd_schema)

    s = command("phantom", "write a synthetic CT study with known lesions")
    s.add_argument("out", metavar="DIR", help="folder to write the instances to")
    s.add_argument("--slices", type=int, default=64, help="number of slices (default 64)")
    s.add_argument("--size", type=int, default=256, help="rows and columns (default 256)")
    s.add_argument(
        "--orientation", default="axial", help="axial, sagittal or coronal (default axial)"
    )
    s.add_argument("--lesions", type=int, default=3, help="number of lesions (default 3)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=cmd_phantom)

    for name, text in DELEGATED.items():
        s = sub.add_parser(name, help=text, add_help=False)
        s.set_defaults(delegate=name)
    return p


def _error(exc: BaseException) -> int:
    errors = getattr(exc, "errors", ())
    if isinstance(exc, DicomNodeError) and len(errors) > 1:
        head = str(exc).splitlines()[0]
        print(f"error: {head}", file=sys.stderr)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {text}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        _setup_logging("INFO")
        try:
            return _delegate(argv[0], argv[1:])
        except DicomNodeError as exc:
            return _error(exc)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DicomNodeError as exc:
        return _error(exc)
    except KeyError as exc:  # an id the stores do not know
        return _error(CommandError(str(exc.args[0]) if exc.args else "not found"))
    except OSError as exc:  # a file or folder that cannot be read or written
        return _error(CommandError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")))


if __name__ == "__main__":
    sys.exit(main())
