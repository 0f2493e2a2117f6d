"""Training recipe: one TOML file names everything a bundle is built from.

A recipe is validated in full when it is loaded (unknown keys rejected, every error names
the offending key), before any data is read or TensorFlow is imported.  Its sections map
onto the bundle card (``docs/model-bundles.md``): ``[bundle]`` -> name, version, task and
texts; ``[preprocessing]`` -> ``card.preprocessing``; ``[[labels]]`` -> ``card.labels``.
This module does not import TensorFlow.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.errors import ConfigError, ModelError
from dicomnode.inference.card import (
    DISCLAIMER_PHRASE,
    Code,
    Label,
    Preprocessing,
    parse_code,
    parse_preprocessing,
)

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class BundleInfo:
    name: str
    version: str
    task: str
    description: str
    intended_use: str
    disclaimer: str
    min_component_volume_mm3: float = 0.0


@dataclass(frozen=True)
class DataSpec:
    """How slices are drawn from the cases (see ``models/data.py``)."""

    validation_fraction: float = 0.2
    patch_size: int = 128  # training crop (rows = columns); 0 trains on whole slices
    positive_fraction: float = 0.5
    min_positive_area_mm2: float = 0.0
    batch_size: int = 16
    validation_slices_per_case: int = 24
    flip: bool = True
    rotation_deg: float = 10.0
    intensity_jitter: float = 0.05
    noise_std: float = 0.0


@dataclass(frozen=True)
class TrainingSpec:
    seed: int = 1234
    epochs: int = 30
    steps_per_epoch: int = 50
    learning_rate: float = 1e-3
    loss: str = "bce"
    early_stopping_patience: int = 5
    min_delta: float = 1e-4


@dataclass(frozen=True)
class ExportSpec:
    opset: int = 17
    tolerance: float = 1e-4


@dataclass(frozen=True)
class Recipe:
    bundle: BundleInfo
    architecture: str
    model_params: dict[str, Any]
    preprocessing: Preprocessing
    context_slices: int
    labels: tuple[Label, ...]
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    source: str = ""

    @property
    def task(self) -> str:
        return self.bundle.task


def _table(d: dict[str, Any], key: str, required: bool = True) -> dict[str, Any]:
    if key not in d:
        if required:
            raise ConfigError(f"recipe: section [{key}] is missing")
        return {}
    value = d[key]
    if not isinstance(value, dict):
        raise ConfigError(f"recipe: [{key}] must be a table")
    return value


def _typed(cls: type, d: dict[str, Any], where: str) -> Any:
    """Build a flat dataclass from a TOML table, rejecting unknown keys and bad types."""
    fields = cls.__dataclass_fields__
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"recipe: unknown key(s) in [{where}]: {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        default = getattr(cls, name, None) if name in fields else None
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"recipe: [{where}] {name} must be true or false")
        if isinstance(default, int | float) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"recipe: [{where}] {name} must be a number")
            value = type(default)(value) if isinstance(default, float) else value
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"recipe: [{where}] {exc}") from None


def _labels(raw: Any, task: str) -> tuple[Label, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("recipe: [[labels]] must list at least one label")
    labels = []
    for i, d in enumerate(raw):
        where = f"labels[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"recipe: {where} must be a table")
        known = {"name", "threshold", "finding", "segment_category", "segment_type", "aggregation"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"recipe: unknown key(s) in {where}: {', '.join(unknown)}")
        try:
            finding = parse_code(d.get("finding"), f"{where}.finding")
            category: Code | None = (
                parse_code(d["segment_category"], f"{where}.segment_category")
                if "segment_category" in d
                else None
            )
            seg_type: Code | None = (
                parse_code(d["segment_type"], f"{where}.segment_type")
                if "segment_type" in d
                else None
            )
        except ModelError as exc:
            raise ConfigError(f"recipe: {exc}") from None
        threshold = d.get("threshold", 0.5)
        if not isinstance(threshold, int | float) or not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"recipe: {where}.threshold must be a number in (0, 1)")
        if task == "segmentation" and (category is None or seg_type is None):
            raise ConfigError(f"recipe: {where} needs segment_category and segment_type")
        aggregation = d.get("aggregation", "max")
        if aggregation not in ("max", "mean"):
            raise ConfigError(f"recipe: {where}.aggregation must be 'max' or 'mean'")
        labels.append(
            Label(
                index=i,
                name=str(d.get("name", f"label{i}")),
                threshold=float(threshold),
                finding=finding,
                segment_category=category,
                segment_type=seg_type,
                aggregation=aggregation,
            )
        )
    return tuple(labels)


def parse_recipe(data: dict[str, Any], source: str = "") -> Recipe:
    """Validate a recipe dictionary (as read from TOML) into a :class:`Recipe`."""
    known = {"bundle", "model", "preprocessing", "labels", "data", "training", "export"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"recipe: unknown section(s): {', '.join(unknown)}")
    b = _table(data, "bundle")
    for key in ("name", "version", "task", "intended_use", "disclaimer"):
        if not isinstance(b.get(key), str) or not b[key]:
            raise ConfigError(f"recipe: [bundle] {key} must be a non-empty string")
    if b["task"] not in ("segmentation", "classification"):
        raise ConfigError("recipe: [bundle] task must be 'segmentation' or 'classification'")
    if DISCLAIMER_PHRASE not in b["disclaimer"].lower():
        raise ConfigError(f"recipe: [bundle] disclaimer must state '{DISCLAIMER_PHRASE}'")
    bundle = _typed(BundleInfo, {"description": "", **b}, "bundle")

    model = dict(_table(data, "model"))
    architecture = model.pop("architecture", None)
    if not isinstance(architecture, str):
        raise ConfigError("recipe: [model] architecture must be a string")

    pre = dict(_table(data, "preprocessing"))
    context = pre.pop("context_slices", 1)
    if not isinstance(context, int) or context < 1 or context % 2 == 0:
        raise ConfigError("recipe: [preprocessing] context_slices must be an odd integer >= 1")
    try:
        preprocessing = parse_preprocessing(pre)
    except ModelError as exc:
        raise ConfigError(f"recipe: {exc}".replace("card field", "key")) from None

    data_spec = _typed(DataSpec, _table(data, "data", required=False), "data")
    if not 0.0 < data_spec.validation_fraction < 1.0:
        raise ConfigError("recipe: [data] validation_fraction must be in (0, 1)")
    if data_spec.patch_size < 0 or data_spec.patch_size % preprocessing.pad_multiple:
        raise ConfigError("recipe: [data] patch_size must be a multiple of pad_multiple")
    training = _typed(TrainingSpec, _table(data, "training", required=False), "training")
    if training.loss not in ("bce", "dice_bce"):
        raise ConfigError("recipe: [training] loss must be 'bce' or 'dice_bce'")
    export = _typed(ExportSpec, _table(data, "export", required=False), "export")
    if not 15 <= export.opset <= 18:
        raise ConfigError("recipe: [export] opset must be in 15..18 (tf2onnx 1.17)")
    return Recipe(
        bundle=bundle,
        architecture=architecture,
        model_params=model,
        preprocessing=preprocessing,
        context_slices=context,
        labels=_labels(data.get("labels"), bundle.task),
        data=data_spec,
        training=training,
        export=export,
        source=source,
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe TOML file; a bare name (``lesion_seg``) means a shipped recipe."""
    p = Path(path)
    if not p.exists() and not p.suffix and (RECIPES_DIR / f"{p.name}.toml").is_file():
        p = RECIPES_DIR / f"{p.name}.toml"
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"recipe: cannot read {p}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe: {p} is not valid TOML: {exc}") from None
    return parse_recipe(data, source=text)
