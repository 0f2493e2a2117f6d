"""Receive rate: dicomnode's SCP against dcmtk storescp and Orthanc, all fed by dcmtk storescu.

Prints instances/s per receiver (min/median/max over --repeat rounds) and the ratios of
dicomnode to storescp and to Orthanc, measured round by round in the same run (the
receivers take turns, so a noisy neighbour hits all of them alike).  Every receiver has
TCP_NODELAY (dcmtk and Orthanc via TCP_NODELAY=1).  With several associations, storescp
runs with ``--fork`` (one process per association), and dicomnode also as two receiving
processes on one port (``dicomnode-2p``: ``[node] receivers = 2``).  Each round takes the
receivers in another order, and each turn starts after ``sync``: what the previous turn
left to write back (storescp and Orthanc write without a sync) is not charged to the next.

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
import sys
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
            raise RuntimeError(f"storescu exited with {p.returncode}: {err.decode()[-500:]}")
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


def start_node(data: Path, port: int, owner: str, reuse_port: bool) -> tuple[StorageSCP, Spool]:
    """One receiving process's SCP and spool (``serve``'s, with ``receivers`` > 1 when
    ``reuse_port``), its receive log's pool of 64 MiB segments ready, as on a node that has
    been receiving for a while."""
    settings = dataclasses.replace(
        NodeSettings(), port=port, data_dir=data, min_free_disk_mb=10, max_associations=16
    )
    spool = Spool(data, Index(Database(data)), min_free_bytes=10 * 2**20, log_owner=owner)
    spool.receive_log().preallocate()
    scp = StorageSCP(settings, spool, reuse_port=reuse_port)
    scp.start()
    return scp, spool


def stop_node(scp: StorageSCP, spool: Spool) -> None:
    scp.stop()
    spool.close()
    spool.index.db.close()


def run_node(files: list[Path], work: Path, associations: int) -> float:
    data = work / "node"
    scp, spool = start_node(data, 0, "0", reuse_port=False)
    try:
        elapsed = storescu(scp.port, scp.settings.ae_title, files, associations)
        assert scp.counters.stored == len(files), scp.counters
        assert scp.fast is not None and scp.fast.served == associations
        return elapsed
    finally:
        stop_node(scp, spool)
        shutil.rmtree(data, ignore_errors=True)


def run_node_receivers(files: list[Path], work: Path, associations: int) -> float:
    """``[node] receivers = 2``: this process and a second one (this script with
    ``--receiver``) on one port with ``SO_REUSEPORT``, sharing the spool and the index; the
    kernel spreads the associations over them."""
    data = work / "node"
    port = free_port()
    scp, spool = start_node(data, port, "0", reuse_port=True)
    other = subprocess.Popen(
        [sys.executable, __file__, "--receiver", str(data), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == b"ready"
        elapsed = storescu(port, scp.settings.ae_title, files, associations)
        stored = spool.index.db.connect().execute("SELECT COUNT(*) FROM instances").fetchone()
        assert stored[0] == len(files), f"{stored[0]} of {len(files)} indexed"
        return elapsed
    finally:
        other.communicate(b"")  # end of input: the second receiver stops
        stop_node(scp, spool)
        shutil.rmtree(data, ignore_errors=True)


def serve_receiver(data: Path, port: int) -> None:
    """The second receiving process of :func:`run_node_receivers`, until stdin ends."""
    scp, spool = start_node(data, port, "1", reuse_port=True)
    print("ready", flush=True)
    sys.stdin.read()
    stop_node(scp, spool)


RECEIVERS: dict[str, Callable[[list[Path], Path, int], float]] = {
    "storescp": run_storescp,
    "orthanc": run_orthanc,
    "dicomnode": run_node,
    "dicomnode-2p": run_node_receivers,
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
    ap.add_argument("--receiver", nargs=2, metavar=("DATA", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        serve_receiver(Path(args.receiver[0]), int(args.receiver[1]))
        return
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
            # Two receiving processes only where there is more than one association.
            here = {k: v for k, v in receivers.items() if assoc > 1 or k != "dicomnode-2p"}
            rates: dict[str, list[float]] = {name: [] for name in here}
            names = list(here)
            for round_ in range(args.repeat):
                # Each round in another order, and each turn from a written-back page
                # cache: the writeback of one receiver's files (storescp and Orthanc leave
                # 151 MiB dirty) is not charged to the next one's turn.
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    os.sync()
                    rates[name].append(len(files) / here[name](files, work, assoc))
            for name, r in rates.items():
                print(line(f"{assoc} assoc  {name}", r, "instances/s"))
            for node in ("dicomnode", "dicomnode-2p"):
                for peer in ("storescp", "orthanc"):
                    if peer in rates and node in rates:
                        ratios = [n / p for n, p in zip(rates[node], rates[peer], strict=True)]
                        print(line(f"{assoc} assoc  {node}/{peer}", ratios, "ratio      ", "7.2f"))


if __name__ == "__main__":
    main()
