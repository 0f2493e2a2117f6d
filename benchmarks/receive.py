"""Receive rate: dicomnode's SCP against dcmtk storescp and Orthanc, all fed by dcmtk storescu.

Prints instances/s per receiver (min/median/max over --repeat rounds) and the ratios of
dicomnode to storescp and to Orthanc, measured round by round in the same run (the
receivers take turns, so a noisy neighbour hits all of them alike).  Every receiver has
TCP_NODELAY (dcmtk and Orthanc via TCP_NODELAY=1).  With several associations, storescp
runs with ``--fork`` (one process per association).

What each one promises when it answers 0x0000: storescp has written the file (no fsync);
Orthanc has written the file and committed its SQLite index; dicomnode has the instance in
its fsynced receive log (the spool file and index row follow, synced at the next
checkpoint; docs/performance.md).  dicomnode runs as ``serve`` does, its receive log's
pool of 64 MiB segments ready, as on a node that has been receiving for a while.

    .venv/bin/python benchmarks/receive.py --slices 300 --size 512 --repeat 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
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


def wait_port(port: int, timeout: float = 30.0) -> None:
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
    args = ["storescp", "-aet", "STORESCP", "-od", str(out)]
    args += ["--fork"] if associations > 1 else []
    proc = subprocess.Popen(
        [*args, str(port)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        return storescu(port, "STORESCP", files, associations)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def run_orthanc(files: list[Path], work: Path, associations: int) -> float:
    folder = work / "orthanc"
    folder.mkdir()
    dicom, http = free_port(), free_port()
    config = {
        "Name": "benchmark",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "HttpPort": http,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomThreadsCount": max(4, associations),
    }
    (folder / "config.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        ["Orthanc", str(folder / "config.json")], cwd=folder, env=ENV, stdout=log, stderr=log
    )
    try:
        wait_port(dicom)
        wait_port(http)
        elapsed = storescu(dicom, "ORTHANC", files, associations)
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics") as r:
            stored = json.load(r)["CountInstances"]
        assert stored == len(files), f"Orthanc holds {stored} of {len(files)} instances"
        return elapsed
    finally:
        proc.terminate()
        proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def run_node(files: list[Path], work: Path, associations: int) -> float:
    data = work / "node"
    settings = dataclasses.replace(
        NodeSettings(), port=0, data_dir=data, min_free_disk_mb=10, max_associations=16
    )
    index = Index(Database(data))
    spool = Spool(data, index, min_free_bytes=10 * 2**20)
    spool.receive_log().preallocate()  # the segments of a node that has been receiving
    scp = StorageSCP(settings, spool)
    scp.start()
    try:
        elapsed = storescu(scp.port, settings.ae_title, files, associations)
        assert scp.counters.stored == len(files), scp.counters
        assert scp.fast is not None and scp.fast.served == associations
        return elapsed
    finally:
        scp.stop()
        spool.close()
        index.db.close()
        shutil.rmtree(data, ignore_errors=True)


RECEIVERS: dict[str, Callable[[list[Path], Path, int], float]] = {
    "storescp": run_storescp,
    "orthanc": run_orthanc,
    "dicomnode": run_node,
}


def line(name: str, values: list[float], unit: str, fmt: str = "7.0f") -> str:
    return (
        f"{name:28} {unit} min {min(values):{fmt}}  median {statistics.median(values):{fmt}}"
        f"  max {max(values):{fmt}}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--without", nargs="*", default=[], choices=list(RECEIVERS))
    args = ap.parse_args()
    receivers = {k: v for k, v in RECEIVERS.items() if k not in args.without}
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        work = Path(tmp)
        spec = PhantomSpec(rows=args.size, columns=args.size, slices=args.slices, n_lesions=3)
        files = write_phantom(generate_phantom(spec), work / "study")
        mb = sum(f.stat().st_size for f in files) / 2**20
        print(
            f"{len(files)} instances of {args.size}x{args.size} ({mb:.0f} MiB), "
            f"{args.repeat} rounds, loopback, TCP_NODELAY everywhere, {os.cpu_count()} CPUs"
        )
        for assoc in args.associations:
            rates: dict[str, list[float]] = {name: [] for name in receivers}
            for _ in range(args.repeat):
                for name, run in receivers.items():
                    rates[name].append(len(files) / run(files, work, assoc))
            for name, r in rates.items():
                print(line(f"{assoc} assoc  {name}", r, "instances/s"))
            for peer in ("storescp", "orthanc"):
                if peer in rates and "dicomnode" in rates:
                    ratios = [n / p for n, p in zip(rates["dicomnode"], rates[peer], strict=True)]
                    print(line(f"{assoc} assoc  dicomnode/{peer}", ratios, "ratio      ", "7.2f"))


if __name__ == "__main__":
    main()
