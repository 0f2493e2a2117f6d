"""``dicomnode`` command line: the only place that configures logging or exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dicomnode.config import Config, default_config_path, load_config
from dicomnode.errors import DicomNodeError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(quiet)


def _config(args: argparse.Namespace) -> Config:
    path = Path(args.config) if getattr(args, "config", None) else default_config_path()
    overrides = {}
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    return load_config(path, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.app.node import Node

    config = _config(args)
    _setup_logging(config.node.log_level)
    Node(config).serve_forever()
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


def cmd_batch(args: argparse.Namespace) -> int:
    from dicomnode.app.batch import run_batch

    config = _config(args)
    _setup_logging("WARNING" if not args.verbose else "INFO")
    s = run_batch(config, Path(args.input), Path(args.output))
    print(
        f"{len(s.done)} done, {len(s.skipped)} skipped (already done), "
        f"{len(s.ignored)} ignored (no route), {len(s.failed)} failed in {s.seconds:.1f} s"
    )
    for study, reason in s.failed.items():
        print(f"  FAILED {study}: {reason}")
    return 0 if s.ok else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicomnode.app.worker import WorkerContext

    config = _config(args)
    ctx = WorkerContext.open(config)
    if args.action == "retry":
        for job_id in args.ids:
            print(f"job {job_id}: -> {ctx.outbox.retry_job(int(job_id))}")
        return 0
    if args.action == "show":
        for job_id in args.ids:
            job = ctx.jobs.get(int(job_id))
            print(json.dumps(dataclasses.asdict(job), indent=2, default=str))
            for item in ctx.outbox.items(job.id):
                print(
                    f"  outbox {item.id}: {item.destination} {item.path.name} {item.state} "
                    f"attempts={item.attempts} status={item.status} {item.last_error}"
                )
        return 0
    jobs = ctx.jobs.list_jobs(state=args.state)
    print(f"{'id':>5} {'state':8} {'att':>3} {'route':16} {'study':>14}  updated   error")
    for j in jobs:
        updated = time.strftime("%H:%M:%S", time.localtime(j.updated_at))
        print(
            f"{j.id:>5} {j.state:8} {j.attempts:>3} {j.route[:16]:16} "
            f"{'…' + j.study_instance_uid[-12:]:>14}  {updated}  {j.last_error[:60]}"
        )
    print(f"jobs: {ctx.jobs.counts()}  outbox: {ctx.outbox.counts()}")
    return 0


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
    studies = scan_folder(Path(args.study_dir))
    if not studies:
        print(f"no DICOM files under {args.study_dir}")
        return 1
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node (C-ECHO/C-STORE SCP, jobs, delivery)")
    s.add_argument("--config", required=True)
    s.add_argument("--port", type=int, help="override [node].port")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check-config", help="validate a configuration file")
    s.add_argument("config")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("demo", help="node + synthetic study + PACS on this machine")
    s.add_argument("--out", help="work folder (default: a new temporary folder)")
    s.add_argument("--slices", type=int, default=64)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("batch", help="convert a folder of DICOM studies offline")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--config")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_batch)

    s = sub.add_parser("jobs", help="list, show or retry jobs")
    s.add_argument("action", nargs="?", choices=["list", "show", "retry"], default="list")
    s.add_argument("ids", nargs="*")
    s.add_argument("--config", required=True)
    s.add_argument("--state")
    s.set_defaults(func=cmd_jobs)

    s = sub.add_parser("route", help="explain which route matches a study folder")
    s.add_argument("action", choices=["explain"])
    s.add_argument("study_dir")
    s.add_argument("--config")
    s.set_defaults(func=cmd_route)

    s = sub.add_parser(
        "schema", help="print the JSON Schema of the configuration, a model card or a recipe"
    )
    s.add_argument("document", choices=["config", "card", "recipe"])
    s.set_defaults(func=cmd_schema)

    s = sub.add_parser("phantom", help="write a synthetic CT study with known lesions")
    s.add_argument("out")
    s.add_argument("--slices", type=int, default=64)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--orientation", default="axial")
    s.add_argument("--lesions", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_phantom)

    for name, text in DELEGATED.items():
        s = sub.add_parser(name, help=text, add_help=False)
        s.set_defaults(delegate=name)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        _setup_logging("INFO")
        try:
            return _delegate(argv[0], argv[1:])
        except DicomNodeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
