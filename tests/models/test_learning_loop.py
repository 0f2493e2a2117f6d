"""Learning from corrections: fine-tune an earlier run on base data plus corrections, export
the next version with its parent and the data it saw, refuse to re-use a version."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from dicomnode.cli import main
from dicomnode.inference.card import load_bundle
from dicomnode.models.run import RunFiles
from dicomnode.models.synthetic import write_case
from dicomnode.synthetic.phantom import Lesion, generate_phantom

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
