"""Study turnaround: last instance acknowledged -> SEG + SR acknowledged by the PACS.

Runs the node (embedded defaults, shipped bundles, one worker process) and a storage SCP
as the PACS; sends synthetic CT studies of each size and reports, per size, min/median/max
over --repeat runs of: the whole turnaround, the same less the quiet period, the node's
own split (job created -> job done) from its index, and the worker's phases (load,
inference, encoding) from the node's metrics, with the execution provider each model ran
on.  ``--providers`` and ``--batch-size`` override the lesion pipeline's (a GPU run:
``--providers cuda cpu --batch-size 64``; benchmarks/gpu.sh).

    .venv/bin/python benchmarks/turnaround.py --slices 64 300 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.app.demo import PACS_AE, demo_config
from dicomnode.app.node import Node
from dicomnode.config import Config
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom


@dataclass
class Run:
    total: float
    in_node: float
    rate: float
    phases: dict[str, float] = field(default_factory=dict)
    providers: dict[str, str] = field(default_factory=dict)


def worker_metrics(node: Node) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds per job phase (sums of the histogram) and the provider of each model."""
    phases: dict[str, float] = {}
    providers: dict[str, str] = {}
    for metric in node.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "dicomnode_job_phase_seconds_sum":
                phases[sample.labels["phase"]] = sample.value
            elif sample.name == "dicomnode_execution_provider" and sample.value == 1:
                providers[sample.labels["model"]] = sample.labels["provider"]
    return phases, providers


def configure(config: Config, quiet: float, args: argparse.Namespace) -> Config:
    pipelines = tuple(
        dataclasses.replace(
            p,
            providers=tuple(args.providers) if args.providers else p.providers,
            batch_size=args.batch_size or p.batch_size,
            heat_maps=args.explain,
            key_images=args.explain,
        )
        for p in config.pipelines
    )
    return dataclasses.replace(
        config,
        pipelines=pipelines,
        completeness=dataclasses.replace(
            config.completeness, quiet_period_s=quiet, poll_interval_s=0.05
        ),
    )


def one_run(work: Path, files: list[Path], quiet: float, args: argparse.Namespace) -> Run:
    pacs = FolderSCP(PACS_AE, work / "pacs")
    pacs.start()
    config = configure(demo_config(work, pacs.port), quiet, args)
    node = Node(config)
    node.start()
    try:
        peer = Peer(config.node.ae_title, "127.0.0.1", node.port)
        t0 = time.perf_counter()
        results = send_files(peer, files, PACS_AE)
        t_last = time.perf_counter()
        assert all(r.ok for r in results)
        assert len(pacs.wait_for(2, timeout=600)) >= 2
        t_done = time.perf_counter()
        job = node.jobs.list_jobs()[0]
        while job.finished_at is None:
            time.sleep(0.01)
            job = node.jobs.get(job.id)
        rate = len(files) / (t_last - t0)
        phases, providers = {}, {}
        for _ in range(100):  # the worker's metrics arrive over a pipe
            phases, providers = worker_metrics(node)
            if "encoding" in phases:
                break
            time.sleep(0.05)
        return Run(t_done - t_last, job.finished_at - job.created_at, rate, phases, providers)
    finally:
        node.stop()
        pacs.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, nargs="+", default=[64, 300])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quiet", type=float, default=1.0)
    ap.add_argument("--providers", nargs="+", choices=["tensorrt", "cuda", "cpu"])
    ap.add_argument("--batch-size", type=int, help="slices per inference batch")
    ap.add_argument(
        "--explain",
        action="store_true",
        help="heat maps and key images on (the demo's choice; off in the embedded defaults)",
    )
    args = ap.parse_args()
    for slices in args.slices:
        runs = []
        with tempfile.TemporaryDirectory(prefix="dicomnode-turnaround-") as tmp:
            spec = PhantomSpec(
                rows=args.size,
                columns=args.size,
                slices=slices,
                seed=11,
                pixel_spacing=(0.7, 0.7),
                slice_thickness=1.25,
            )
            files = write_phantom(generate_phantom(spec), Path(tmp) / "study")
            for i in range(args.repeat):
                runs.append(one_run(Path(tmp) / f"run{i}", files, args.quiet, args))

        def fmt(xs: list[float]) -> str:
            return f"min {min(xs):6.2f}  median {statistics.median(xs):6.2f}  max {max(xs):6.2f}"

        totals = [r.total for r in runs]
        print(
            f"{slices} slices of {args.size}x{args.size}, {args.repeat} runs, "
            f"quiet period {args.quiet} s"
        )
        print(f"  last ack -> results acked (s):           {fmt(totals)}")
        print(f"  same, quiet period excluded (s):         {fmt([t - args.quiet for t in totals])}")
        print(f"  in the node: job created -> done (s):    {fmt([r.in_node for r in runs])}")
        for phase in ("load", "inference", "encoding"):
            seconds = [r.phases.get(phase, math.nan) for r in runs]
            print(f"  worker {phase + ' (s):':<32} {fmt(seconds)}")
        print(f"  receive rate (instances/s, our SCU):     {fmt([r.rate for r in runs])}")
        used = sorted({f"{m} on {p}" for r in runs for m, p in r.providers.items()})
        print(f"  models ran on: {', '.join(used) or 'unknown'}")


if __name__ == "__main__":
    main()
