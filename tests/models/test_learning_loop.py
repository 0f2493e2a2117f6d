"""Learning from corrections: fine-tune an earlier run on base data plus corrections, export
the next version with its parent and the data it saw, refuse to re-use a version."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.app.node import Node
from dicomnode.cli import main
from dicomnode.config import PipelineSettings
from dicomnode.feedback.collect import FeedbackCollector
from dicomnode.inference.card import load_bundle
from dicomnode.models.run import RunFiles
from dicomnode.models.synthetic import build_segmentation, write_case
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.outputs.layout import job_folder, results_root
from dicomnode.spool.feedback import FeedbackInbox, FeedbackState
from dicomnode.synthetic.phantom import Lesion, generate_phantom, write_phantom
from integration.peers import wait_until

pytestmark = [
    pytest.mark.train,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def runs(
    tiny_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
    make_recipe: Callable[..., Any],
    make_spec: Callable[..., Any],
) -> dict[str, Path]:
    """A base run, a corrections folder as the node keeps it, and a fine-tuned run."""
    root = tmp_path_factory.mktemp("loop")
    recipe = root / "tiny_seg.toml"
    recipe.write_text(make_recipe("lesion_seg").source)
    base = root / "base"
    assert main(["train", str(recipe), "--data", str(tiny_data), "--out", str(base)]) == 0
    # corrections: image series with the radiologist's SEG and the node's provenance file
    corrections = root / "feedback"
    lesion = Lesion(center_mm=(60.0, -10.0, 0.0), radius_mm=12.0, hu=30.0)
    entry = write_case(generate_phantom(make_spec(7, (lesion,))), corrections / "study")
    (corrections / "study" / "1.2.3.4.json").write_text(
        json.dumps(
            {
                "feedback_id": 3,
                "sop_instance_uid": "1.2.3.4",
                "corrects": {"job_id": 9, "model": "lesion-seg", "model_version": "1.0.0"},
                "series_instance_uid": entry["series_instance_uid"],
            }
        )
    )
    tuned = root / "tuned"
    argv = ["train", str(recipe), "--data", str(tiny_data), "--data", str(corrections)]
    assert main([*argv, "--init-from", str(base), "--out", str(tuned)]) == 0
    return {"base": base, "tuned": tuned, "corrections": corrections, "root": root}


def weights(run: Path) -> list[np.ndarray]:
    model = keras.saving.load_model(RunFiles(run).best, compile=False)
    return [np.asarray(w) for w in model.get_weights()]


def test_fine_tuning_starts_from_the_earlier_run_and_sees_the_corrections(
    runs: dict[str, Path], tiny_data: Path
) -> None:
    info = json.loads(RunFiles(runs["tuned"]).training.read_text())
    assert info["data_dir"] == [str(tiny_data), str(runs["corrections"])]
    assert info["init_from"] == str(runs["base"])
    assert "5 CT series" in info["data_description"]  # 4 base cases + 1 correction
    # two steps of Adam move each weight a little; a fresh start would differ by far more
    base, tuned = weights(runs["base"]), weights(runs["tuned"])
    assert [w.shape for w in base] == [w.shape for w in tuned]
    assert max(float(np.abs(a - b).max()) for a, b in zip(base, tuned, strict=True)) < 0.05


def test_export_records_the_parent_and_the_data_it_saw(runs: dict[str, Path]) -> None:
    parent, child = runs["root"] / "bundle-1", runs["root"] / "bundle-2"
    assert main(["export", str(runs["base"]), "--out", str(parent)]) == 0
    # the next version needs a version of its own
    same = main(["export", str(runs["tuned"]), "--out", str(child), "--parent", str(parent)])
    assert same == 2 and not child.exists()
    argv = ["export", str(runs["tuned"]), "--out", str(child), "--parent", str(parent)]
    assert main([*argv, "--version", "1.0.1"]) == 0
    card = load_bundle(child).card  # the runtime's loader accepts the rewritten card
    first = load_bundle(parent).card
    assert card.version == "1.0.1" and card.name == first.name
    assert card.provenance["parent"] == {
        "name": first.name,
        "version": first.version,
        "sha256": first.sha256,
        "path": str(parent),
    }
    seen = card.provenance["training_data"]
    assert seen["init_from"] == str(runs["base"])
    assert seen["corrections"] == [
        {
            "feedback_id": 3,
            "sop_instance_uid": "1.2.3.4",
            "corrects": {"job_id": 9, "model": "lesion-seg", "model_version": "1.0.0"},
        }
    ]


@pytest.mark.slow
def test_the_whole_loop_corrections_in_better_model_out_worse_refused(
    node_factory: Callable[..., Node],
    folder_scp: FolderSCP,
    tiny_data: Path,
    tmp_path: Path,
    make_recipe: Callable[..., Any],
    make_spec: Callable[..., Any],
) -> None:
    # Given version 1.0.0: a model trained for one step, exported, and run by a node (the
    # shipped recipe's schedule for small lesions, soft labels and a lesion-weighted loss,
    # needs more steps than a test has: the tiny model learns with 1.0.0's)
    recipe = tmp_path / "tiny_seg.toml"
    early = {"soft_labels": False, "positive_sampling": "voxel", "positive_fraction": 0.5}
    recipe.write_text(make_recipe("lesion_seg", data=early, training={"loss": "dice_bce"}).source)
    base, v1 = tmp_path / "base", tmp_path / "lesion-seg-1.0.0"
    assert (
        main(["train", str(recipe), "--data", str(tiny_data), "--out", str(base), "--steps", "1"])
        == 0
    )
    assert main(["export", str(base), "--out", str(v1), "--version", "1.0.0"]) == 0
    config = node_factory(start=False, pacs_port=folder_scp.port).config
    pipelines = (PipelineSettings("lesion", {"segmentation": v1}, providers=("cpu",)),)
    node = Node(dataclasses.replace(config, pipelines=pipelines))
    node.start()
    try:
        # When studies come, are processed, and a radiologist sends back corrected SEGs
        lesions = [
            (Lesion(center_mm=(-65.0, 5.0, 0.0), radius_mm=13.0, hu=30.0),),
            (Lesion(center_mm=(70.0, -15.0, 2.0), radius_mm=12.0, hu=-50.0),),
        ]
        corrected = []
        for i, found in enumerate(lesions):
            # Fixed study UIDs: the node keeps corrections under feedback/<study UID>/, and
            # training orders (and splits) its cases by path: random UIDs would make the
            # fine-tuned model, and so the gate's verdict, differ from run to run
            uid = f"1.2.826.0.1.3680043.8.498.4040{i}"
            spec = make_spec(40 + i, found, study_instance_uid=uid, series_instance_uid=f"{uid}.1")
            phantom = generate_phantom(spec)
            files = write_phantom(phantom, tmp_path / f"study-{i}")
            assert all(
                r.ok for r in send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, "PACS")
            )
            wait_until(
                lambda n=i + 1: [j.state for j in node.jobs.list_jobs()] == ["done"] * n,
                120,
                f"job {i + 1} to finish",
            )
            seg = build_segmentation(phantom)  # the lesions as they are: the correction
            seg.Manufacturer, seg.ContentCreatorName = "Example Viewer", "Doe^Jane"
            path = tmp_path / f"corrected-{i}.dcm"
            seg.save_as(path, enforce_file_format=True)
            assert send_files(Peer("DICOMNODE", "127.0.0.1", node.port), [path], "RADIOLOGY")[0].ok
            corrected.append(str(seg.SOPInstanceUID))
        wait_until(
            lambda: all(node.index.instance_versions(uid) for uid in corrected), 30, "the SEGs"
        )
        # (the running node settles them itself; a collector run meanwhile settles the rest)
        FeedbackCollector(node.index.db, node.jobs).collect()
        settled = FeedbackInbox(node.index.db).records()
        assert [r.state for r in settled] == [FeedbackState.ACCEPTED] * 2
        assert len(node.jobs.list_jobs()) == 2  # the corrections made no job
        feedback = node.config.node.data_dir / "feedback"
    finally:
        node.stop(timeout=30)
    # ... and the model is fine-tuned on the base data plus the corrections, then exported
    tuned, v2 = tmp_path / "tuned", tmp_path / "lesion-seg-1.0.1"
    argv = ["train", str(recipe), "--data", str(tiny_data), "--data", str(feedback)]
    argv += ["--init-from", str(base), "--out", str(tuned), "--epochs", "8", "--steps", "40"]
    assert main(argv) == 0
    argv = ["export", str(tuned), "--out", str(v2), "--parent", str(v1), "--version", "1.0.1"]
    assert main(argv) == 0
    card = load_bundle(v2).card
    assert card.provenance["parent"]["version"] == "1.0.0"
    seen = card.provenance["training_data"]["corrections"]
    assert sorted(c["sop_instance_uid"] for c in seen) == sorted(corrected)
    assert all(c["corrects"]["model_version"] == "1.0.0" for c in seen)
    # Then on held-out cases the gate lets the better model out ...
    held_out = tmp_path / "held-out"
    for i, found in enumerate(
        [
            (Lesion(center_mm=(-60.0, 0.0, 0.0), radius_mm=13.0, hu=20.0),),
            (Lesion(center_mm=(65.0, -15.0, 0.0), radius_mm=11.0, hu=50.0),),
        ]
    ):
        write_case(generate_phantom(make_spec(60 + i, found)), held_out / f"case_{i}")
    gate = ["--data", str(held_out), "--tolerance", "0.01"]
    assert (
        main(["evaluate", str(v2), "--against", str(v1), *gate, "--out", str(tmp_path / "g1")]) == 0
    )
    report = json.loads((tmp_path / "g1" / "gate.json").read_text())
    dice = report["metrics"]["lesion.case_dice_mean"]
    assert dice["candidate"] > dice["current"] + 0.2, dice
    # ... and refuses the worse one
    assert (
        main(["evaluate", str(v1), "--against", str(v2), *gate, "--out", str(tmp_path / "g2")]) == 1
    )
    assert (
        "lesion.case_dice_mean" in json.loads((tmp_path / "g2" / "gate.json").read_text())["worse"]
    )
    # And the node switches to the new version by configuration, and rolls back the same way
    for version, bundle in (("1.0.1", v2), ("1.0.0", v1)):
        pipelines = (PipelineSettings("lesion", {"segmentation": bundle}, providers=("cpu",)),)
        data_dir = tmp_path / f"node-{version}"
        node = Node(
            dataclasses.replace(
                config,
                pipelines=pipelines,
                node=dataclasses.replace(config.node, data_dir=data_dir),
            )
        )
        node.start()
        try:
            phantom = generate_phantom(make_spec(80, lesions[0]))
            files = write_phantom(phantom, tmp_path / f"study-{version}")
            assert all(
                r.ok for r in send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, "PACS")
            )
            wait_until(
                lambda n=node: [j.state for j in n.jobs.list_jobs()] == ["done"], 120, "the job"
            )
            (job,) = node.jobs.list_jobs()
            folder = job_folder(results_root(data_dir), job.id)
            (seg_path,) = [p for p in folder.rglob("*.dcm") if dcmread(p).Modality == "SEG"]
            made = dcmread(seg_path, stop_before_pixels=True)
            versions = made.SoftwareVersions  # one value or several (pydicom)
            first = versions if isinstance(versions, str) else versions[0]
            assert first == version, versions
        finally:
            node.stop(timeout=30)
