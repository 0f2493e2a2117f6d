"""``dicomnode batch --ray`` on a real local Ray cluster (a head and a second node).

Given a folder of studies (one that cannot be processed, one no route matches, a file that
is not DICOM) and the same folder converted by the local batch, when it is converted on the
cluster, then the result files are the local ones (:mod:`scale.outputs`), the studies were
spread over both nodes, the failed study is reported and the others are done; a second run
skips what is done.  And when the second node is killed mid-batch, every study still gets
exactly its results: the studies it held are sent again.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
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


def sent_to(log: str, node: str) -> set[str]:
    """The studies the driver has sent to an actor on ``node``."""
    return set(re.findall(rf"study (\S+) \([^)]*\): sent to actor \d+ on node {node}", log))


def in_hand(log: str, node: str) -> set[str]:
    """The studies the driver has sent to an actor on ``node`` and not had back."""
    sent = sent_to(log, node)
    back = re.findall(r"study (\S+)(?: \([^)]*\))?: (?:processed on node|its Ray worker)", log)
    return sent - set(back)


def test_second_node_killed_mid_batch_costs_no_study(two_nodes: RayCluster, tmp_path: Path) -> None:
    from dicomnode.app.raybackend import IN_FLIGHT  # Ray is there: the cluster started

    config = write_config(tmp_path)
    count = 16
    write_studies(tmp_path / "in", count, PhantomSpec(rows=256, columns=256, slices=40, lesions=()))
    local = run_batch(
        load_config(config), tmp_path / "in", tmp_path / "local", progress=False, created=CREATED
    )
    assert len(local.done) == count
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
            # Its actor holds two studies (one running, the next waiting): however quickly
            # the running one ends, the other is still there when the node is killed.
            wait_until(
                lambda: (
                    len(in_hand(log.read_text(), second)) == IN_FLIGHT or driver.poll() is not None
                ),
                180,
                "two studies in hand on the second node",
                interval=0.01,
            )
            held = in_hand(log.read_text(), second)
            finished = 0
            with contextlib.suppress(FileNotFoundError):
                finished = len(json.loads(manifest.read_text())["studies"])

            two_nodes.kill_second()  # raylet, agents and the actor in the middle of a study

            out, _ = driver.communicate(timeout=180)
        finally:
            two_nodes.kill(driver)
    err = log.read_text()
    assert len(held) == IN_FLIGHT, f"the batch ended first: {err[-3000:]}"
    assert finished < count, "the node was killed after the last study"
    assert driver.returncode == 0, err[-3000:]
    assert f"{count} done, 0 skipped" in out and "0 failed" in out
    deaths = re.findall(r"study (\S+) \([^)]*\): its Ray worker died \(\w+\); sent again", err)
    died = set(deaths)
    assert len(deaths) == len(died), f"a study died twice: {deaths}"
    # At least the one waiting behind the running one (a study takes about half a second);
    # a study sent there between the look and the kill may have died too, none after it:
    # the actor gets nothing while Ray restarts it (that would only spend attempts), and
    # it answers again from the head (unless the other actor finished the batch first:
    # then it was sent nothing more at all).
    actor = re.findall(rf"Ray actor (\d+) answers on node {second}", err)[0]
    restarting = err.index(f"Ray actor {actor} is restarting")
    back = re.compile(rf"Ray actor {actor} answers on node (\w+)").search(err, restarting)
    if back is None:
        assert f"sent to actor {actor} on" not in err[restarting:], err[restarting:][:3000]
    else:
        assert back.group(1) != second, err[restarting:][:3000]
        assert f"sent to actor {actor} on" not in err[restarting : back.start()]
    assert died & held and died <= sent_to(err[:restarting], second), f"in hand {held}, {died}"
    assert_same_results(tmp_path / "local", tmp_path / "out")
    placed = dict(PLACED.findall(err))
    assert len(placed) == count
    assert all(placed[study] != second for study in died), "processed on the dead node"


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
