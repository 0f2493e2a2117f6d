"""Study turnaround: last instance acknowledged -> SEG + SR acknowledged by the PACS.

Runs the node (embedded defaults, shipped bundles, one worker process) and a storage SCP
as the PACS; sends synthetic CT studies of each size and reports, per size, min/median/max
over --repeat runs of: the whole turnaround, the same less the quiet period, and the
node's own split (job created -> job done) from its index.

    .venv/bin/python benchmarks/turnaround.py --slices 64 300 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from dicomnode.app.demo import PACS_AE, demo_config
from dicomnode.app.node import Node
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom


def one_run(work: Path, files: list[Path], quiet: float) -> tuple[float, float, float]:
    pacs = FolderSCP(PACS_AE, work / "pacs")
    pacs.start()
    config = demo_config(work, pacs.port)
    config = dataclasses.replace(
        config,
        completeness=dataclasses.replace(
            config.completeness, quiet_period_s=quiet, poll_interval_s=0.05
        ),
    )
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
        return t_done - t_last, job.finished_at - job.created_at, rate
    finally:
        node.stop()
        pacs.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, nargs="+", default=[64, 300])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quiet", type=float, default=1.0)
    args = ap.parse_args()
    for slices in args.slices:
        totals, node_times, rates = [], [], []
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
                total, in_node, rate = one_run(Path(tmp) / f"run{i}", files, args.quiet)
                totals.append(total)
                node_times.append(in_node)
                rates.append(rate)

        def fmt(xs: list[float]) -> str:
            return f"min {min(xs):6.2f}  median {statistics.median(xs):6.2f}  max {max(xs):6.2f}"

        print(
            f"{slices} slices of {args.size}x{args.size}, {args.repeat} runs, "
            f"quiet period {args.quiet} s"
        )
        print(f"  last ack -> results acked (s):           {fmt(totals)}")
        print(f"  same, quiet period excluded (s):         {fmt([t - args.quiet for t in totals])}")
        print(f"  in the node: job created -> done (s):    {fmt(node_times)}")
        print(f"  receive rate (instances/s, our SCU):     {fmt(rates)}")


if __name__ == "__main__":
    main()
