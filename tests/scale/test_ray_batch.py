"""``dicomnode batch --ray`` on a real local Ray cluster (a head and a second node).

Given a folder of studies (one that cannot be processed, one no route matches, a file that
is not DICOM) and the same folder converted by the local batch, when it is converted on the
cluster, then the result files are the local ones (:mod:`scale.outputs`), the studies were
spread over both nodes, the failed study is reported and the others are done; a second run
skips what is done.  And when the second node is killed mid-batch, every study still gets
exactly its results.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app.batch import run_batch
from dicomnode.config import load_config
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom
from fixtures_models import max_classifier, threshold_segmenter
from integration.peers import wait_until

from .cluster import VENV_BIN, RayCluster
from .outputs import CREATED, assert_same_results

pytestmark = [pytest.mark.slow, pytest.mark.ray]

PLACED = re.compile(r"study (\S+): processed on node (\w+)")


def write_config(folder: Path, actors: int = 2) -> Path:
    seg = threshold_segmenter(folder / "seg")
    cls = max_classifier(folder / "cls")
    path = folder / "node.toml"
    path.write_text(f"""
[ray]
actors = {actors}
num_cpus = 1
[jobs]
max_attempts = 5
backoff_initial_s = 1.0
[[folders]]
name = "out"
path = "{folder / "unused"}"
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


def write_studies(root: Path, count: int, spec: PhantomSpec) -> None:
    for i in range(count):
        phantom = generate_phantom(PhantomSpec(**{**spec.__dict__, "seed": 100 + i}))
        write_phantom(phantom, root / f"site{i % 3}" / f"study{i:02d}")


def write_untidy(root: Path) -> None:
    """A study with two slices at one position (fails), a short one (ignored), a text file."""
    files = write_phantom(
        generate_phantom(PhantomSpec(rows=64, columns=64, slices=10, seed=7, lesions=())),
        root / "broken",
    )
    ds = dcmread(files[3])
    ds.ImagePositionPatient = dcmread(files[4]).ImagePositionPatient
    ds.save_as(files[3])
    write_phantom(
        generate_phantom(PhantomSpec(rows=64, columns=64, slices=4, lesions=())), root / "short"
    )
    (root / "notes.txt").write_text("not DICOM")


def batch_argv(input_dir: Path, output_dir: Path, config: Path, cluster: RayCluster) -> list[str]:
    return [
        str(VENV_BIN / "dicomnode"),
        "batch",
        str(input_dir),
        str(output_dir),
        "--config",
        str(config),
        "--ray",
        cluster.address,
        "--created-at",
        CREATED.isoformat(),
        "-v",
    ]


def test_batch_on_two_nodes_is_the_local_batch_and_resumes(
    two_nodes: RayCluster, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    write_studies(tmp_path / "in", 6, PhantomSpec(rows=64, columns=64, slices=10, lesions=()))
    write_untidy(tmp_path / "in")
    local = run_batch(
        load_config(config), tmp_path / "in", tmp_path / "local", progress=False, created=CREATED
    )
    assert len(local.done) == 6 and len(local.ignored) == 1 and len(local.failed) == 1

    first = two_nodes.run(batch_argv(tmp_path / "in", tmp_path / "out", config, two_nodes), 240)

    assert first.returncode == 1, first.stderr[-3000:]
    assert "6 done, 0 skipped" in first.stdout and "1 ignored (no route), 1 failed" in first.stdout
    assert "ImagingError" in first.stdout
    assert "studies/s" in first.stderr and "left" in first.stderr  # the progress bar
    assert_same_results(tmp_path / "local", tmp_path / "out")
    placed = dict(PLACED.findall(first.stderr))
    assert len(placed) == 8 and len(set(placed.values())) == 2, "not spread over both nodes"

    again = two_nodes.run(batch_argv(tmp_path / "in", tmp_path / "out", config, two_nodes), 240)

    assert again.returncode == 1
    assert "0 done, 6 skipped (already done)" in again.stdout
    assert_same_results(tmp_path / "local", tmp_path / "out")


def test_second_node_killed_mid_batch_costs_no_study(two_nodes: RayCluster, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    # Studies that take a while each, so that one is in flight on the second node when it dies
    write_studies(tmp_path / "in", 12, PhantomSpec(rows=256, columns=256, slices=40, lesions=()))
    local = run_batch(
        load_config(config), tmp_path / "in", tmp_path / "local", progress=False, created=CREATED
    )
    assert len(local.done) == 12
    second = two_nodes.node_ids()["second"]
    manifest, log = tmp_path / "out" / "manifest.json", tmp_path / "driver.log"
    with log.open("w") as stderr:
        driver = two_nodes.command(
            [*batch_argv(tmp_path / "in", tmp_path / "out", config, two_nodes), "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            # Its actor has started and has studies in hand: the next is sent when one is done.
            wait_until(
                lambda: (
                    f"processed on node {second}" in log.read_text() or driver.poll() is not None
                ),
                180,
                "a study processed on the second node",
                interval=0.02,
            )
            # The driver logs a study's result before it sends that actor the next one: a
            # moment later (a study takes about a second) the next is in flight there.
            time.sleep(0.3)
            finished = 0
            with contextlib.suppress(FileNotFoundError):
                finished = len(json.loads(manifest.read_text())["studies"])

            two_nodes.kill_second()  # raylet, agents and the actor in the middle of a study

            out, _ = driver.communicate(timeout=180)
        finally:
            two_nodes.kill(driver)
    err = log.read_text()
    assert finished < 12, "the node was killed after the last study"
    assert driver.returncode == 0, err[-3000:]
    assert "12 done, 0 skipped" in out and "0 failed" in out
    assert "its Ray worker died" in err and "sent again" in err, "no study was in flight there"
    assert_same_results(tmp_path / "local", tmp_path / "out")
    nodes = [node for _, node in PLACED.findall(err)]
    assert len(nodes) == 12 and second in nodes


def test_ray_asked_for_but_not_installed_says_how_to_install(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    script = (
        "import sys; sys.modules['ray'] = None; from dicomnode.cli import main; "
        f"sys.exit(main(['batch', {str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, "
        "'--ray']))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'dicomnode[ray]'" in done.stderr
