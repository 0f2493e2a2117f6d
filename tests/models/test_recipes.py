"""Recipes are validated in full when loaded; the shipped ones carry the agreed codes."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from dicomnode.errors import ConfigError
from dicomnode.models.recipe import RECIPES_DIR, load_recipe, parse_recipe


def shipped(name: str) -> dict[str, Any]:
    return tomllib.loads((RECIPES_DIR / f"{name}.toml").read_text())


def test_shipped_recipes_load_with_their_codes() -> None:
    seg = load_recipe("lesion_seg")
    cls = load_recipe(RECIPES_DIR / "lesion_cls.toml")
    assert seg.task == "segmentation" and cls.task == "classification"
    (label,) = seg.labels
    assert (label.segment_category.value, label.segment_category.scheme) == ("49755003", "SCT")
    assert label.segment_type.value in ("4147007", "52988006")
    assert label.finding.value == "52988006" and cls.labels[0].finding.value == "52988006"
    for recipe in (seg, cls):
        assert "not for diagnostic use" in recipe.bundle.disclaimer.lower()
        assert recipe.export.opset == 17 and recipe.training.seed
        assert recipe.preprocessing.pad_multiple % 2 ** recipe.model_params["depth"] == 0


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("bundle", "disclaimer", "Use freely.", "not for diagnostic use"),
        ("bundle", "task", "detection", "task"),
        ("data", "patch_sise", 64, "unknown key"),
        ("data", "patch_size", 100, "multiple of pad_multiple"),
        ("training", "epochs", "ten", "must be a number"),
        ("export", "opset", 19, "opset"),
        ("preprocessing", "window_max", -2000.0, "window_max"),
        ("preprocessing", "context_slices", 2, "odd"),
    ],
)
def test_bad_recipes_are_refused_naming_the_key(
    section: str, key: str, value: object, message: str
) -> None:
    data = shipped("lesion_seg")
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_recipe(data)


def test_segmentation_labels_need_segment_codes() -> None:
    data = shipped("lesion_seg")
    del data["labels"][0]["segment_type"]
    with pytest.raises(ConfigError, match="segment_category and segment_type"):
        parse_recipe(data)
