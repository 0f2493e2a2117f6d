"""Fixtures for the training-module tests: tiny phantom cases and shrunk recipes.

Under ``--import-mode=importlib`` test modules cannot import this file, so its helpers are
handed out as fixtures (``make_spec``, ``make_recipe``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicomnode.models.recipe import Recipe, load_recipe, parse_recipe
from dicomnode.models.synthetic import write_case
from dicomnode.synthetic.phantom import Lesion, PhantomSpec, generate_phantom

#: Small, coarse phantoms (64 x 64 at 5 mm) so a whole case is cheap to train and export.
TINY = dict(rows=64, columns=64, slices=8, pixel_spacing=(5.0, 5.0), slice_thickness=6.0)


def tiny_spec(index: int, lesions: tuple[Lesion, ...] = (), **over: Any) -> PhantomSpec:
    return PhantomSpec(
        **{**TINY, **over},
        lesions=lesions,
        noise_hu=10.0,
        seed=index,
        patient_id=f"TINY{index}",
        series_description=f"TINY {index}",
    )


TINY_LESIONS = (
    (Lesion(center_mm=(70.0, -5.0, 0.0), radius_mm=14.0, hu=40.0),),
    (
        Lesion(center_mm=(-70.0, 10.0, 5.0), radius_mm=12.0, hu=-100.0),
        Lesion(center_mm=(75.0, -20.0, -4.0), radius_mm=10.0, hu=60.0),
    ),
    (),
    (Lesion(center_mm=(-65.0, -25.0, 0.0), radius_mm=13.0, hu=0.0),),
)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for a recipe: tables of scalars, arrays of tables, inline code tables."""
    lines: list[str] = []
    for section, body in data.items():
        items = body if isinstance(body, list) else [body]
        for item in items:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
            lines.append("")
    return "\n".join(lines)


def tiny_recipe(name: str, **sections: dict[str, Any]) -> Recipe:
    """A shipped recipe shrunk to a tiny network, patch and schedule (for smoke runs)."""
    import tomllib

    data = tomllib.loads(load_recipe(name).source)
    data["model"].update(base_filters=4, depth=2)
    data["preprocessing"]["target_spacing_mm"] = 5.0
    data["data"].update(
        patch_size=32, batch_size=4, validation_slices_per_case=4, validation_fraction=0.25
    )
    data["training"].update(epochs=1, steps_per_epoch=2, early_stopping_patience=1)
    for key, values in sections.items():
        data.setdefault(key, {}).update(values)
    text = dump_toml(data)
    assert tomllib.loads(text) == data
    return parse_recipe(data, source=text)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four labelled cases (one without lesions) under one folder."""
    root = tmp_path_factory.mktemp("tiny-data")
    for i, lesions in enumerate(TINY_LESIONS):
        write_case(generate_phantom(tiny_spec(i, lesions)), root / f"case_{i}")
    return root


@pytest.fixture(scope="session")
def make_spec() -> Callable[..., PhantomSpec]:
    """``make_spec(index, lesions=(), **overrides)``: a tiny phantom spec."""
    return tiny_spec


@pytest.fixture(scope="session")
def make_recipe() -> Callable[..., Recipe]:
    """``make_recipe(name, **sections)``: a shipped recipe shrunk for smoke runs."""
    return tiny_recipe
