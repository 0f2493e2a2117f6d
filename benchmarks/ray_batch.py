"""Batch conversion on Ray against the local process pool, on this machine.

For each worker count asked for (1, 2, 4 by default), the same folder of synthetic CT studies
is converted ``--repeat`` times by each backend, each run into a fresh output folder:

    local   ``dicomnode batch --workers N`` (a pool of N processes, each with its sessions)
    ray     ``dicomnode batch --ray --actors N`` on a Ray instance started here, once, with
            as many logical CPUs as the most actors (each actor asks for 1 CPU)

and prints studies per minute (min / median / max over the repeats; a run's time includes
starting its workers and loading the models, as a user waits for it), Ray's overhead as
the ratio Ray / local of each repeat's time (>1: Ray is slower), the per-study cost that
sizing needs (CPU seconds of all the workers per study: it does not depend on what else
the machine runs, as run times do), and the memory of each worker (resident set at the
end of a run, and its peak).  Every Ray run's results are
checked against the local run's (the same files, byte for byte: one creation time).

The pipeline is the embedded default one (the shipped lesion models on the CPU) unless
``--config`` names another.  Ray runs in a network namespace of its own with only a
loopback interface (the script re-runs itself under ``unshare -n``; ``-rn`` when not root),
so that none of its traffic leaves the machine; with ``--no-namespace`` it binds 127.0.0.1.

    python benchmarks/ray_batch.py                              # 12 studies, 1 2 4, 3 repeats
    python benchmarks/ray_batch.py --studies 8 --workers 1 2 --repeat 2 --size 128 --slices 32

Run it on an otherwise quiet machine (``nice`` does not make figures comparable).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMESPACE_FLAG = "DICOMNODE_BENCH_IN_NAMESPACE"


def reexec_in_namespace() -> None:
    """Run this script again inside a loopback-only network namespace (once)."""
    if os.environ.get(NAMESPACE_FLAG) or shutil.which("unshare") is None:
        return
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    script = 'ip link set lo up && exec "$0" "$@"'
    argv = [*unshare, "--", "sh", "-c", script, sys.executable, *sys.argv]
    env = {**os.environ, NAMESPACE_FLAG: "1"}
    if subprocess.run([*unshare, "true"], capture_output=True).returncode == 0:
        os.execvpe(argv[0], argv, env)
    print("no network namespace here: Ray binds 127.0.0.1", file=sys.stderr)


#: One creation time for every run, so that each Ray run's files can be compared with the
#: local run's byte for byte.
CREATED = datetime.datetime(2026, 12, 1, 8, 0, 0)


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    #: CPU seconds of all the workers of a run, per study.
    cpu_per_study: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)


def write_studies(root: Path, count: int, size: int, slices: int) -> None:
    from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

    for i in range(count):
        spec = PhantomSpec(rows=size, columns=size, slices=slices, seed=1000 + i)
        write_phantom(generate_phantom(spec), root / f"study{i:03d}")


def process_usage(pid: int) -> tuple[float, float, float]:
    """(resident MiB, peak resident MiB, CPU seconds) of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024, cpu


def pool_processes(pid: int) -> list[int]:
    """The process pool's workers: children of ``pid`` started by multiprocessing."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid and b"multiprocessing" in command:
                found.append(int(entry.name))
    return found


def run_local(
    config: Any, studies: Path, out: Path, workers: int
) -> tuple[float, list[tuple[float, float]]]:
    from dicomnode.app.batch import PoolRunner, run_batch

    started = time.perf_counter()
    runner = PoolRunner(config, out, workers)
    try:
        summary = run_batch(config, studies, out, progress=False, runner=runner, created=CREATED)
        seconds = time.perf_counter() - started
        usage = [process_usage(pid) for pid in pool_processes(os.getpid())]
    finally:
        runner.close()
    assert summary.ok and summary.done, summary.failed
    return seconds, usage


def run_ray(
    config: Any, studies: Path, out: Path, actors: int
) -> tuple[float, list[tuple[float, float]]]:
    import dataclasses

    from dicomnode.app.batch import run_batch
    from dicomnode.app.raybackend import RayStudyRunner

    config = dataclasses.replace(
        config, ray=dataclasses.replace(config.ray, actors=actors, num_cpus=1.0)
    )
    started = time.perf_counter()
    runner = RayStudyRunner(config, out, "")
    try:
        summary = run_batch(config, studies, out, progress=False, runner=runner, created=CREATED)
        seconds = time.perf_counter() - started
        usage = [(s["rss_mb"], s["max_rss_mb"], s["cpu_s"]) for s in runner.stats()]
    finally:
        runner.close()
    assert summary.ok and summary.done, summary.failed
    return seconds, usage


def same_results(expected: Path, actual: Path) -> bool:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from scale.outputs import assert_same_results

    try:
        assert_same_results(expected, actual)
    except AssertionError as exc:
        print(f"ERROR: {exc}")
        return False
    return True


def spread(values: list[float], digits: int = 1) -> str:
    return " / ".join(
        f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--size", type=int, default=256, help="rows and columns (default 256)")
    parser.add_argument("--slices", type=int, default=48, help="slices per study (default 48)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--config", type=Path, help="node configuration (default: embedded)")
    parser.add_argument("--no-namespace", action="store_true")
    args = parser.parse_args()
    if not args.no_namespace:
        reexec_in_namespace()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from dicomnode.config import default_config_path, load_config

    config = load_config(args.config or default_config_path())
    root = Path(tempfile.mkdtemp(prefix="ray-batch-bench-"))
    try:
        studies = root / "in"
        write_studies(studies, args.studies, args.size, args.slices)
        ray.init(
            num_cpus=max(args.workers),
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        print(
            f"{args.studies} studies of {args.size}x{args.size}x{args.slices}, pipeline "
            f"{config.pipelines[0].name!r}, {os.cpu_count()} CPU(s), {args.repeat} repeat(s)"
        )
        results: dict[tuple[str, int], Runs] = {}
        for n in args.workers:
            for r in range(args.repeat):
                for backend in ("local", "ray"):
                    out = root / f"{backend}-{n}-{r}"
                    run = run_local if backend == "local" else run_ray
                    seconds, usage = run(config, studies, out, n)
                    runs = results.setdefault((backend, n), Runs())
                    runs.seconds.append(seconds)
                    runs.cpu_per_study.append(sum(u[2] for u in usage) / args.studies)
                    runs.rss_mb += [u[0] for u in usage]
                    runs.peak_mb += [u[1] for u in usage]
                    if backend == "ray" and not same_results(root / f"local-{n}-{r}", out):
                        print(f"ERROR: ray results of {n} actor(s), repeat {r} differ from local")
                        return 1
                    print(
                        f"  {backend:5} {n} worker(s), repeat {r + 1}: {seconds:.1f} s", flush=True
                    )
                shutil.rmtree(root / f"local-{n}-{r}")
                shutil.rmtree(root / f"ray-{n}-{r}")
        report(results, args.workers, args.studies)
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: dict[tuple[str, int], Runs], workers: list[int], studies: int) -> None:
    print()
    print(
        "workers | backend | studies/min (min / median / max) | worker CPU-s per study "
        "(median) | RSS per worker MiB (median, peak max)"
    )
    for n in workers:
        for backend in ("local", "ray"):
            runs = results[(backend, n)]
            rates = [60 * studies / s for s in runs.seconds]
            cost = statistics.median(runs.cpu_per_study)
            print(
                f"{n:7} | {backend:7} | {spread(rates):>32} | {cost:31.2f} | "
                f"{statistics.median(runs.rss_mb):.0f}, {max(runs.peak_mb):.0f}"
            )
    print()
    print("workers | Ray time / local time per repeat (min / median / max)")
    for n in workers:
        local, on_ray = results[("local", n)].seconds, results[("ray", n)].seconds
        ratios = [ray_s / local_s for local_s, ray_s in zip(local, on_ray, strict=True)]
        print(f"{n:7} | {spread(ratios, 2)}")
    base = {b: statistics.median(results[(b, workers[0])].seconds) for b in ("local", "ray")}
    print()
    print("speed-up over the first worker count (median times)")
    for n in workers:
        print(
            f"{n:7} | local {base['local'] / statistics.median(results[('local', n)].seconds):.2f}x"
            f" | ray {base['ray'] / statistics.median(results[('ray', n)].seconds):.2f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
