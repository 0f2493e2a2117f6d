"""Receive rate: dicomnode's SCP against dcmtk storescp, both fed by dcmtk storescu.

Prints instances/s per run (min/median/max over --repeat runs) and the ratio to storescp
measured in the same run.  Both sides have TCP_NODELAY (dcmtk via TCP_NODELAY=1).

    .venv/bin/python benchmarks/receive.py --slices 300 --size 512 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dicomnode.config import NodeSettings
from dicomnode.db import Database
from dicomnode.net.scp import StorageSCP
from dicomnode.spool.index import Index
from dicomnode.spool.store import Spool
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def storescu(port: int, ae: str, files: list[Path], associations: int) -> float:
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", ae, "127.0.0.1", str(port), *map(str, chunk)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def run_storescp(files: list[Path], work: Path, associations: int) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    args = [
        "storescp",
        "-aet",
        "STORESCP",
        "-od",
        str(out),
        "--fork" if associations > 1 else "",
        str(port),
    ]
    proc = subprocess.Popen(
        [a for a in args if a], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        return storescu(port, "STORESCP", files, associations)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def run_node(files: list[Path], work: Path, associations: int) -> float:
    data = work / "node"
    settings = dataclasses.replace(NodeSettings(), port=0, data_dir=data, min_free_disk_mb=10)
    index = Index(Database(data))
    scp = StorageSCP(settings, Spool(data, index, min_free_bytes=10 * 2**20))
    scp.start()
    try:
        elapsed = storescu(scp.port, settings.ae_title, files, associations)
        assert scp.counters.stored == len(files), scp.counters
        return elapsed
    finally:
        scp.stop()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        work = Path(tmp)
        spec = PhantomSpec(rows=args.size, columns=args.size, slices=args.slices, n_lesions=3)
        files = write_phantom(generate_phantom(spec), work / "study")
        mb = sum(f.stat().st_size for f in files) / 2**20
        print(
            f"{len(files)} instances of {args.size}x{args.size} ({mb:.0f} MiB), "
            f"{args.repeat} runs each, loopback, TCP_NODELAY on both sides"
        )
        for assoc in args.associations:
            rates: dict[str, list[float]] = {"storescp": [], "dicomnode": []}
            for _ in range(args.repeat):
                rates["storescp"].append(len(files) / run_storescp(files, work, assoc))
                rates["dicomnode"].append(len(files) / run_node(files, work, assoc))
            ratios = [n / s for n, s in zip(rates["dicomnode"], rates["storescp"], strict=True)]
            for name, r in rates.items():
                print(
                    f"  {assoc} assoc  {name:10} instances/s min {min(r):7.0f}  "
                    f"median {statistics.median(r):7.0f}  max {max(r):7.0f}"
                )
            print(
                f"  {assoc} assoc  ratio dicomnode/storescp min {min(ratios):.2f}  "
                f"median {statistics.median(ratios):.2f}  max {max(ratios):.2f}"
            )


if __name__ == "__main__":
    main()
