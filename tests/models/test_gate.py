"""The gate: `dicomnode evaluate CANDIDATE --against CURRENT` refuses a worse model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dicomnode.cli import main
from dicomnode.config import builtin_bundle
from dicomnode.models.gate import compare, gated_metrics
from dicomnode.models.synthetic import SyntheticConfig, write_dataset


def segmentation_summary(dice: float, small_sensitivity: float | None) -> dict[str, object]:
    return {
        "labels": {
            "lesion": {
                "case_dice_mean": dice,
                "lesion_precision": 1.0,
                "lesions": 12,  # a count: never gated
                "by_radius": {
                    "lt_5mm": {"sensitivity": small_sensitivity, "dice_mean": 0.9, "lesions": 4},
                    "ge_5mm": {"sensitivity": 1.0, "dice_mean": 0.95, "lesions": 8},
                },
            }
        }
    }


def test_a_metric_worse_beyond_the_tolerance_refuses_the_candidate() -> None:
    current = segmentation_summary(0.95, 1.0)
    within = compare("segmentation", segmentation_summary(0.945, 1.0), current, 0.01)
    assert within.accepted
    worse = compare("segmentation", segmentation_summary(0.97, 0.75), current, 0.01)
    assert not worse.accepted
    assert [v.name for v in worse.worse] == ["lesion.by_radius.lt_5mm.sensitivity"]
    # a metric the candidate lost (nothing of a bucket detected) is worse too
    lost = compare("segmentation", segmentation_summary(0.97, None), current, 0.01)
    assert [v.name for v in lost.worse] == ["lesion.by_radius.lt_5mm.sensitivity"]
    assert "lesion.lesions" not in gated_metrics("segmentation", current)
    with pytest.raises(ValueError, match="tolerance"):
        compare("segmentation", current, current, 1.5)


def test_precision_f1_volume_error_and_slice_figures_are_gated_too() -> None:
    """Every reported quality figure: a larger volume error (lower is better) or a lower
    per-bucket precision, F1 or slice-level AUC refuses the candidate."""

    def summary(volume_error: float, precision: float, auc: float) -> dict[str, object]:
        bucket = {"precision": precision, "f1": precision, "volume_error_abs_max": volume_error}
        slice_level = {"roc_auc": auc}
        return {"labels": {"lesion": {"by_radius": {"3_to_5mm": bucket}, "slice": slice_level}}}

    current = summary(0.05, 1.0, 0.99)
    assert compare("segmentation", summary(0.03, 1.0, 0.99), current, 0.01).accepted
    assert compare("segmentation", summary(0.055, 1.0, 0.995), current, 0.01).accepted
    worse = compare("segmentation", summary(0.12, 0.8, 0.9), current, 0.01)
    assert sorted(v.name for v in worse.worse) == [
        "lesion.by_radius.3_to_5mm.f1",
        "lesion.by_radius.3_to_5mm.precision",
        "lesion.by_radius.3_to_5mm.volume_error_abs_max",
        "lesion.slice.roc_auc",
    ]


def test_classification_metrics_are_gated_per_level() -> None:
    def summary(auc: float) -> dict[str, object]:
        metrics = {"accuracy": 0.9, "f1": 0.9, "roc_auc": auc, "n": 100}
        return {"labels": {"lesion": {"slice": metrics, "study": dict(metrics)}}}

    report = compare("classification", summary(0.90), summary(0.97), 0.01)
    assert [v.name for v in report.worse] == ["lesion.slice.roc_auc", "lesion.study.roc_auc"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small held-out cases with lesions of every size (DICOM + SEG labels)."""
    out = tmp_path_factory.mktemp("held-out")
    config = SyntheticConfig(negative_fraction=0.0, max_slices=16, max_matrix=192)
    write_dataset(out, 3, seed=1234, config=config)
    return out


def degraded_bundle(folder: Path) -> Path:
    """The shipped segmentation bundle, its components under 3,000 mm3 dropped: the same
    network, fewer lesions found (the small ones)."""
    shutil.copytree(builtin_bundle("lesion-seg"), folder)
    card = json.loads((folder / "card.json").read_text())
    card["min_component_volume_mm3"] = 3000.0
    card["version"] = "1.0.1-degraded"
    (folder / "card.json").write_text(json.dumps(card, indent=1))
    return folder


def test_evaluate_refuses_a_worse_candidate_and_accepts_a_better_one(
    held_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped, worse = builtin_bundle("lesion-seg"), degraded_bundle(tmp_path / "worse")
    # When the degraded model is the candidate against the shipped one
    status = main(
        ["evaluate", str(worse), "--against", str(shipped), "--data", str(held_out),
         "--out", str(tmp_path / "refused")]
    )  # fmt: skip
    # Then it is refused: exit 1, the report names the metrics it lost
    assert status == 1
    err = capsys.readouterr().err
    assert "refused:" in err
    report = json.loads((tmp_path / "refused" / "gate.json").read_text())
    assert report["accepted"] is False
    assert "lesion.lesion_sensitivity" in report["worse"]
    assert report["metrics"]["lesion.lesion_sensitivity"]["current"] == 1.0
    assert (tmp_path / "refused" / "candidate" / "metrics.json").is_file()
    assert (tmp_path / "refused" / "current" / "metrics.json").is_file()
    # When the roles are swapped, the shipped model (better on every metric) passes
    status = main(
        ["evaluate", str(shipped), "--against", str(worse), "--data", str(held_out),
         "--out", str(tmp_path / "accepted")]
    )  # fmt: skip
    assert status == 0
    assert json.loads((tmp_path / "accepted" / "gate.json").read_text())["accepted"] is True
    assert "accepted:" in capsys.readouterr().out


def test_models_of_different_tasks_are_not_compared(
    held_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["evaluate", str(builtin_bundle("lesion-seg")), "--against",
         str(builtin_bundle("lesion-cls")), "--data", str(held_out), "--out", str(tmp_path)]
    )  # fmt: skip
    assert status == 2
    assert "are not comparable" in capsys.readouterr().err


def test_a_current_model_no_better_than_chance_sets_no_recall_or_specificity_bar() -> None:
    """A model that flags every slice has recall 1.0 by construction: a candidate that finds
    seven lesion slices of eight and flags nothing else must be able to replace it.  Its
    precision, accuracy, F1 and AUC are still gated, and so are recall and specificity
    against a current model with any skill."""

    def summary(recall: float, specificity: float, precision: float) -> dict[str, object]:
        level = {
            "recall": recall,
            "specificity": specificity,
            "precision": precision,
            "accuracy": (recall + specificity) / 2,
        }
        return {"labels": {"lesion": {"slice": level, "study": dict(level)}}}

    flags_everything = summary(1.0, 0.0, 0.1)
    real = summary(0.875, 0.99, 0.9)
    report = compare("segmentation", real, flags_everything, 0.01)
    assert report.accepted
    (recall,) = [v for v in report.verdicts if v.name == "lesion.slice.recall"]
    assert not recall.worse and recall.delta == pytest.approx(-0.125)
    assert recall.note is not None and "no better than chance" in recall.note
    assert report.to_dict()["metrics"]["lesion.slice.recall"]["not_gated"] == recall.note
    # classification gates slice and study alike
    assert compare("classification", real, flags_everything, 0.01).accepted
    # the rest is gated still: a candidate less precise than the flag-everything model fails
    worse = compare("segmentation", summary(0.9, 0.5, 0.05), flags_everything, 0.01)
    assert [v.name for v in worse.worse] == ["lesion.slice.precision"]
    # a current model with skill (recall + specificity > 1) keeps its recall bar
    skilled = summary(1.0, 0.2, 0.2)
    assert [v.name for v in compare("segmentation", real, skilled, 0.01).worse] == [
        "lesion.slice.recall"
    ]
    # and so does a model that flags nothing: its specificity is not a bar either
    flags_nothing = summary(0.0, 1.0, 0.0)
    assert compare("segmentation", real, flags_nothing, 0.01).accepted
