"""Soak: the long versions of the fault tests in ``tests/faults`` (crash anywhere, load).

    .venv/bin/python benchmarks/soak.py --kills 100
    .venv/bin/python benchmarks/soak.py --load-seconds 300 --associations 16
    .venv/bin/python benchmarks/soak.py --kills 100 --load-seconds 300

``--kills N`` runs ``dicomnode serve`` (one worker process) and SIGKILLs it, with its worker,
N times while tiny studies (64 x 64 x 10) flow through it, aiming at receive, assembly,
inference and delivery in turn; then it checks the spool, the index and what dcmtk
storescp (the PACS) received.  ``--load-seconds S`` sends fresh studies on
``--associations`` concurrent storescu associations for S seconds and samples the RSS of
the node and its worker.  Prints the figures; exits 1 when a check fails.  Needs dcmtk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from dicomnode.synthetic.phantom import PhantomSpec  # noqa: E402
from faults.crash import crash_campaign  # noqa: E402
from faults.harness import Unavailable  # noqa: E402
from faults.load import load_campaign  # noqa: E402
from fixtures_models import max_classifier, threshold_segmenter  # noqa: E402


def _say(started: float) -> object:
    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {message}", flush=True)

    return say


def run_kills(work: Path, kills: int, seed: int, seg: Path, cls: Path) -> bool:
    report = crash_campaign(
        work / "crash",
        kills,
        segmentation=seg,
        classification=cls,
        seed=seed,
        drain_timeout=600.0,
        progress=_say(time.monotonic()),  # type: ignore[arg-type]
    )
    print("\n== crash anywhere ==")
    print(report.summary())
    failures = {
        "acknowledged instances missing or damaged": report.missing,
        "studies not processed": report.not_processed,
        "results never delivered": report.undelivered,
        "unexpected results at the PACS": report.unexpected,
        "results received twice although sent once": report.unexplained_duplicates(),
        "index problems": report.problems,
    }
    return _verdict(failures, report.node_log)


def run_load(
    work: Path, seconds: float, associations: int, size: int, slices: int, seg: Path, cls: Path
) -> bool:
    spec = PhantomSpec(
        rows=size,
        columns=size,
        slices=slices,
        pixel_spacing=(358 / size, 358 / size),
        slice_thickness=5.0,
        n_lesions=1,
    )
    report = load_campaign(
        work / "load",
        seconds,
        associations,
        segmentation=seg,
        classification=cls,
        spec=spec,
        drain_timeout=max(600.0, seconds * 4),
        progress=_say(time.monotonic()),  # type: ignore[arg-type]
    )
    print("\n== load ==")
    print(report.summary())
    bound = max(16 * 1024, report.bytes_after_warm_up() // 1024 // 4)
    growth = report.growth_kib()
    print(f"node RSS growth after warm-up: {growth / 1024:.1f} MiB (bound {bound / 1024:.1f} MiB)")
    failures = {
        "failed stores": report.failed,
        "studies not processed": report.not_processed,
        "node RSS grew with the instances": [f"{growth} KiB"] if growth > bound else [],
    }
    return _verdict(failures, work / "load" / "node.log")


def _verdict(failures: dict[str, list[str]], log: Path) -> bool:
    ok = True
    for what, items in failures.items():
        if items:
            ok = False
            print(f"FAILED: {what}: {len(items)}: {items[:5]}")
    print("all checks passed" if ok else f"node log: {log}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=0, help="SIGKILL points (e.g. 100)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--load-seconds", type=float, default=0.0, help="sustained load (e.g. 300)")
    p.add_argument("--associations", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="rows = columns of the load studies")
    p.add_argument("--slices", type=int, default=16, help="slices per load study")
    p.add_argument("--work", help="keep everything in this folder (default: a temporary one)")
    args = p.parse_args()
    if not args.kills and not args.load_seconds:
        p.error("give --kills and/or --load-seconds")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dicomnode-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    seg = threshold_segmenter(work / "bundles" / "seg")
    cls = max_classifier(work / "bundles" / "cls")
    ok = True
    try:
        if args.kills:
            ok &= run_kills(work, args.kills, args.seed, seg, cls)
        if args.load_seconds:
            ok &= run_load(
                work, args.load_seconds, args.associations, args.size, args.slices, seg, cls
            )
    except Unavailable as exc:
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2
    print(f"everything is in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
