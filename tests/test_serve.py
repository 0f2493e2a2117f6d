"""`dicomnode serve` as a process: worker processes, SIGTERM, restart keeps queued work."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomnode.app.worker import WorkerContext
from dicomnode.config import load_config
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, echo, send_files
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom
from fixtures_models import max_classifier, threshold_segmenter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, port: int, pacs_port: int, quiet: float) -> Path:
    seg = threshold_segmenter(tmp_path / "seg")
    cls = max_classifier(tmp_path / "cls")
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
port = {port}
data_dir = "data"
workers = 1
min_free_disk_mb = 10
[completeness]
quiet_period_s = {quiet}
poll_interval_s = 0.1
[delivery]
backoff_initial_s = 0.2
[[remotes]]
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
[[pipelines]]
name = "lesion"
bundles.segmentation = "{seg}"
bundles.classification = "{cls}"
[[routes]]
name = "ct"
pipeline = "lesion"
destinations = ["@sender"]
[[routes.match]]
Modality = "CT"
""")
    return path


def start(config: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            echo(Peer("DICOMNODE", "127.0.0.1", port, 2.0), "PACS")
            return proc
        except Exception:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode() if proc.stdout else "") from None
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("node did not start")


def send_study(tmp_path: Path, port: int) -> None:
    """A small lesion-free phantom, sent as the PACS would; every instance acknowledged."""
    files = write_phantom(
        generate_phantom(PhantomSpec(rows=64, columns=64, slices=12, lesions=())),
        tmp_path / "study",
    )
    assert all(r.ok for r in send_files(Peer("DICOMNODE", "127.0.0.1", port), files, "PACS"))


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


@pytest.mark.slow
def test_serve_processes_in_a_worker_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    # Given a node started by the CLI with one worker process, and a PACS
    pacs = FolderSCP("PACS", tmp_path / "pacs")
    pacs.start()
    port = free_port()
    config = write_config(tmp_path, port, pacs.port, quiet=0.5)
    proc = start(config, port)
    try:
        # When the PACS sends a study
        send_study(tmp_path, port)
        # Then SEG and SR come back
        assert len(pacs.wait_for(2, timeout=90)) == 2
    finally:
        log = stop(proc)
        pacs.stop()
    assert "stopped; queued work stays" in log


@pytest.mark.slow
def test_sigterm_before_completion_keeps_the_study_for_the_next_start(tmp_path: Path) -> None:
    pacs = FolderSCP("PACS", tmp_path / "pacs")
    pacs.start()
    port = free_port()
    # Given a node with a long quiet period that receives a study and is stopped
    config = write_config(tmp_path, port, pacs.port, quiet=3600)
    proc = start(config, port)
    files = write_phantom(
        generate_phantom(PhantomSpec(rows=64, columns=64, slices=12, lesions=())),
        tmp_path / "study",
    )
    assert all(r.ok for r in send_files(Peer("DICOMNODE", "127.0.0.1", port), files, "PACS"))
    stop(proc)
    assert pacs.received == []
    # When it starts again with a short quiet period
    config = write_config(tmp_path, port, pacs.port, quiet=0.5)
    proc = start(config, port)
    try:
        # Then the study is processed once and delivered once
        assert len(pacs.wait_for(2, timeout=90)) == 2
        cfg = load_config(config)
        jobs = WorkerContext.open(cfg).jobs
        deadline = time.monotonic() + 30
        while jobs.counts() != {"done": 1} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert jobs.counts() == {"done": 1}
    finally:
        stop(proc)
        pacs.stop()
    assert len(pacs.received) == 2
    assert os.path.isdir(tmp_path / "data" / "spool")


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "spawn_main" in cmdline and "resource_tracker" not in cmdline


@pytest.mark.slow
def test_a_dead_worker_is_replaced_and_the_next_study_processed(tmp_path: Path) -> None:
    pacs = FolderSCP("PACS", tmp_path / "pacs")
    pacs.start()
    port = free_port()
    proc = start(write_config(tmp_path, port, pacs.port, quiet=0.5), port)
    try:
        # Given the node's worker process is killed
        deadline = time.monotonic() + 30
        workers: list[int] = []
        while not workers and time.monotonic() < deadline:
            workers = [p for p in children(proc.pid) if is_worker(p)]
            time.sleep(0.1)
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        # When a study arrives
        send_study(tmp_path, port)
        # Then a new worker processes it
        assert len(pacs.wait_for(2, timeout=90)) == 2
    finally:
        log = stop(proc)
        pacs.stop()
    assert "died" in log and "starting a new worker" in log
