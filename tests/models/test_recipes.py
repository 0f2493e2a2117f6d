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
        ("training", "epochs", "ten", r"'training\.epochs': Input should be a valid integer"),
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


def test_every_error_is_reported_at_once_with_suggestions() -> None:
    data = shipped("lesion_seg")
    data["data"]["patch_sise"] = 64
    data["training"]["epochs"] = "ten"
    data["export"]["opset"] = 19
    with pytest.raises(ConfigError) as caught:
        parse_recipe(data)
    errors = caught.value.errors
    assert len(errors) == 3, errors
    assert "'data.patch_sise' is an unknown key; did you mean 'patch_size'?" in errors
    assert any(e.startswith("'export.opset'") for e in errors)


def test_recipe_and_card_share_one_schema_for_context_slices() -> None:
    """An even context is refused by the recipe and by the card alike (it used to pass the
    card)."""
    from dicomnode.config import builtin_bundle
    from dicomnode.errors import ModelError
    from dicomnode.inference.card import CARD_FILE, parse_card

    card = __import__("json").loads((builtin_bundle("lesion-seg") / CARD_FILE).read_text())
    card["input"]["context_slices"] = 2
    with pytest.raises(ModelError, match=r"'input\.context_slices': .*must be odd"):
        parse_card(card)
