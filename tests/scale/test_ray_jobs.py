"""The node's jobs on a real local Ray cluster (``worker_backend = "ray"``).

Given ``dicomnode serve`` with its jobs on the cluster's actors and a folder destination,
when dcmtk's storescu sends it studies, then every study gets one job, processed on the
cluster (on both nodes), and exactly its SEG and SR delivered once.  And when the second
node is killed while jobs run on it, nothing acknowledged is lost and every study still
gets exactly its results.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.synthetic.phantom import PhantomSpec
from faults.harness import TINY, IndexView, parse_storescu, write_study
from fixtures_models import max_classifier, threshold_segmenter
from integration.peers import wait_until

from .cluster import VENV_BIN, RayCluster

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.peer]


def free_port() -> int:
    """A port free on this machine (and so in the cluster's fresh network namespace too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = free_port()
PROCESSED = re.compile(r"job (\d+): processed on node (\w+)")
STARTED = re.compile(r"Ray actor (\d+) started on node (\w+)")
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def node_config(
    folder: Path,
    cluster: RayCluster,
    port: int,
    quiet_s: float = 1.0,
    *,
    actors: int = 2,
    num_cpus: int = 1,
) -> Path:
    seg = threshold_segmenter(folder / "seg")
    cls = max_classifier(folder / "cls")
    path = folder / "node.toml"
    path.write_text(f"""
[node]
port = {port}
data_dir = "{folder / "data"}"
worker_backend = "ray"
log_level = "INFO"
[completeness]
quiet_period_s = {quiet_s}
poll_interval_s = 0.2
ask_sender = false
[jobs]
max_attempts = 5
backoff_initial_s = 0.5
backoff_max_s = 2.0
[ray]
address = "{cluster.address}"
actors = {actors}
num_cpus = {num_cpus}
[[folders]]
name = "out"
path = "{folder / "delivered"}"
[[pipelines]]
name = "lesion"
bundles.segmentation = "{seg}"
bundles.classification = "{cls}"
[[routes]]
name = "ct"
pipeline = "lesion"
destinations = ["out"]
[[routes.match]]
Modality = "CT"
instance_count = {{ ge = 8 }}
""")
    return path


class ServedNode:
    """``dicomnode serve`` inside the cluster's network, its log in a file."""

    def __init__(self, cluster: RayCluster, config: Path, log: Path) -> None:
        self.cluster = cluster
        self.log = log
        self._log_file = log.open("w")
        self.process = cluster.command(
            [str(VENV_BIN / "dicomnode"), "serve", "--config", str(config)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: a graceful stop
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.cluster.kill(self.process)
        self.cluster.kill(self.process)
        self._log_file.close()


def send(cluster: RayCluster, storescu: str, files: list[Path]) -> list[Path]:
    """Send ``files`` with storescu (retried until the node listens); the acknowledged."""

    def attempt() -> list[Path]:
        argv = [storescu, "-v", "-aet", "PACS", "-aec", "DICOMNODE", "-R", "127.0.0.1"]
        done = cluster.run([*argv, str(PORT), *map(str, files)], timeout=120)
        outcome = parse_storescu(done.stdout + done.stderr, files, done.returncode)
        return outcome.acknowledged

    return wait_until(attempt, 60, "the node to accept the study", interval=0.5)


def write_studies(root: Path, count: int, spec: PhantomSpec) -> dict[str, list[Path]]:
    studies = {}
    for i in range(count):
        files = write_study(root / f"study{i}", seed=200 + i, spec=spec)
        studies[str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)] = files
    return studies


def delivered(folder: Path) -> dict[str, list[str]]:
    """Study -> SOP classes of the files delivered for it (one folder per job)."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.glob("job-*/*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        found.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.SOPClassUID))
    return {study: sorted(classes) for study, classes in found.items()}


def check_every_study_has_exactly_its_results(
    folder: Path, index: IndexView, studies: dict[str, list[Path]]
) -> None:
    jobs = index.query("SELECT study_instance_uid, state FROM jobs")
    assert Counter(r[0] for r in jobs) == Counter(dict.fromkeys(studies, 1)), "one job each"
    assert {r[1] for r in jobs} == {"done"}
    assert delivered(folder / "delivered") == dict.fromkeys(studies, sorted([SEG_CLASS, SR_CLASS]))
    outbox = index.query("SELECT job_id, state FROM outbox")
    assert len(outbox) == 2 * len(studies) and {r[1] for r in outbox} == {"done"}
    for study, files in studies.items():
        assert index.instance_count(study) == len(files), "an acknowledged instance is missing"


def test_node_runs_its_jobs_on_both_nodes(
    two_nodes: RayCluster, tmp_path: Path, storescu: str
) -> None:
    studies = write_studies(tmp_path / "in", 4, TINY)
    # Three actors of 2 CPUs on two nodes of 2 CPUs: the third has no room and never
    # starts.  Its job loop takes no job (one it took would stay "running" for good).
    config = node_config(tmp_path, two_nodes, PORT, actors=3, num_cpus=2)
    node = ServedNode(two_nodes, config, tmp_path / "node.log")
    index = IndexView(tmp_path / "data")
    try:
        # Both actors that fit run (one on each node) before the studies come, and the
        # studies come side by side (one association each), so the four jobs are queued
        # together: each running actor's loop takes one of them at once.
        wait_until(lambda: len(STARTED.findall(node.text())) == 2, 120, "both Ray actors to start")
        with ThreadPoolExecutor(len(studies)) as pool:
            sent = list(pool.map(partial(send, two_nodes, storescu), studies.values()))
        assert sent == list(studies.values())

        wait_until(
            lambda: index.job_states() == Counter(done=4) and not index.phases(),
            120,
            "four jobs done and delivered",
            interval=0.2,
        )
    finally:
        node.stop()
    check_every_study_has_exactly_its_results(tmp_path, index, studies)
    text = node.text()
    placed = dict(STARTED.findall(text))
    assert sorted(placed.values()) == sorted(two_nodes.node_ids().values()), placed
    nodes = {node_id for _, node_id in PROCESSED.findall(text)}
    assert nodes == set(placed.values()), "the jobs did not run on both nodes"
    assert "stopped; queued work stays" in text  # SIGTERM: a graceful stop


def test_second_node_killed_mid_job_loses_nothing(
    two_nodes: RayCluster, tmp_path: Path, storescu: str
) -> None:
    spec = PhantomSpec(rows=128, columns=128, slices=40, lesions=())
    studies = write_studies(tmp_path / "in", 10, spec)
    second = two_nodes.node_ids()["second"]
    config = node_config(tmp_path, two_nodes, PORT, quiet_s=2.0)
    node = ServedNode(two_nodes, config, tmp_path / "node.log")
    index = IndexView(tmp_path / "data")
    try:
        with ThreadPoolExecutor(len(studies)) as pool:  # one association each, side by side:
            sent = list(pool.map(partial(send, two_nodes, storescu), studies.values()))
        assert sent == list(studies.values())  # ... the jobs are queued close together
        wait_until(  # both actors busy, the one on the second node started (it has a result)
            lambda: (
                index.job_states()["running"] == 2 and f"processed on node {second}" in node.text()
            ),
            180,
            "both actors busy, one of them on the second node",
            interval=0.02,
        )
        at_kill = index.job_states()

        two_nodes.kill_second()  # raylet, agents and the actor in the middle of a job

        wait_until(
            lambda: index.job_states() == Counter(done=10) and not index.phases(),
            180,
            "ten jobs done and delivered",
            interval=0.2,
        )
        wait_until(  # Ray restarts the lost actor where there is room: on the head
            lambda: "answers on node" in node.text(), 120, "the restarted actor to answer"
        )
    finally:
        node.stop()
    check_every_study_has_exactly_its_results(tmp_path, index, studies)
    assert at_kill["done"] < 10
    text = node.text()
    lost = re.findall(r"job (\d+).*the Ray actor running the job was lost", text)
    assert lost, "no job ran on the node"
    # Only the job in the dead actor's hands failed: its thread took no other job until
    # Ray had restarted the actor (on the head: the second node is gone)
    assert len(lost) == 1, f"jobs sent to the restarting actor: {lost}"
    restarting = re.findall(r"Ray actor (\d+) is restarting", text)
    answers = re.findall(r"Ray actor (\d+) answers on node (\w+)", text)
    assert len(restarting) == 1 and answers == [(restarting[0], two_nodes.node_ids()["head"])]
    assert "stopped; queued work stays" in text  # SIGTERM: a graceful stop


def test_ray_backend_without_ray_says_how_to_install(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nworker_backend = "ray"\n')
    script = (
        "import sys; sys.modules['ray'] = None; from dicomnode.cli import main; "
        f"sys.exit(main(['serve', '--config', {str(config)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'dicomnode[ray]'" in done.stderr
