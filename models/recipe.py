"""Training recipe: one TOML file names everything a bundle is built from.

A recipe is validated in full when it is loaded (:mod:`dicomnode.schema`: unknown keys
rejected with a suggestion, every error at once naming its key), before any data is read
or TensorFlow is imported.  Its sections use the bundle card's own classes
(:mod:`dicomnode.inference.card`): ``[bundle]`` -> name, version, task and texts;
``[preprocessing]`` -> ``card.preprocessing`` (plus ``context_slices``, the card's
``input.context_slices``, odd in both); ``[[labels]]`` -> ``card.labels`` (indexed in
order).  This module does not import TensorFlow.
"""

from __future__ import annotations

import tomllib
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from dicomnode.errors import ConfigError
from dicomnode.inference.card import (
    DISCLAIMER_PHRASE,
    Code,
    ContextSlices,
    Label,
    Preprocessing,
    Probability,
    Task,
    label_errors,
)
from dicomnode.schema import STRICT, json_schema, validate_document

RECIPES_DIR = Path(__file__).parent / "recipes"

Text = Annotated[str, Field(min_length=1)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


@dataclass(frozen=True, config=STRICT)
class BundleInfo:
    name: Text
    version: Text
    task: Task
    intended_use: Text
    disclaimer: Text
    description: str = ""
    min_component_volume_mm3: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _disclaimer(self) -> BundleInfo:
        if DISCLAIMER_PHRASE not in self.disclaimer.lower():
            raise ValueError(f"disclaimer must state '{DISCLAIMER_PHRASE}'")
        return self


@dataclass(frozen=True, config=STRICT)
class DataSpec:
    """How slices are drawn from the cases (see ``models/data.py``)."""

    validation_fraction: Fraction = 0.2
    #: training crop (rows = columns); 0 trains on whole slices
    patch_size: Annotated[int, Field(ge=0)] = 128
    positive_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    min_positive_area_mm2: Annotated[float, Field(ge=0)] = 0.0
    batch_size: Annotated[int, Field(ge=1)] = 16
    validation_slices_per_case: Annotated[int, Field(ge=1)] = 24
    flip: bool = True
    rotation_deg: Annotated[float, Field(ge=0)] = 10.0
    intensity_jitter: Annotated[float, Field(ge=0)] = 0.05
    noise_std: Annotated[float, Field(ge=0)] = 0.0
    #: train segmentation on the label resampled like the image, not thresholded: the
    #: fraction of a model pixel the label covers, so the output's 0.5 level lies where the
    #: edge lies within the pixel (sub-pixel edges after ``restore_slices``)
    soft_labels: bool = False
    #: where positive patches are centred: on a labelled voxel drawn uniformly ("voxel",
    #: large lesions dominate) or on a voxel of a lesion drawn uniformly ("lesion": every
    #: connected lesion as often, small ones included)
    positive_sampling: Literal["voxel", "lesion"] = "voxel"


@dataclass(frozen=True, config=STRICT)
class TrainingSpec:
    seed: int = 1234
    epochs: Annotated[int, Field(ge=1)] = 30
    steps_per_epoch: Annotated[int, Field(ge=1)] = 50
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    #: ``lesion_weighted_bce``: BCE weighing pixels near a lesion more (models/losses.py)
    loss: Literal["bce", "dice_bce", "lesion_weighted_bce"] = "bce"
    early_stopping_patience: Annotated[int, Field(ge=1)] = 5
    min_delta: Annotated[float, Field(ge=0)] = 1e-4


@dataclass(frozen=True, config=STRICT)
class ExportSpec:
    #: tf2onnx 1.17 converts opsets 15-18 (19 fails)
    opset: Annotated[int, Field(ge=15, le=18)] = 17
    tolerance: Annotated[float, Field(ge=0)] = 1e-4


@dataclass(frozen=True, config=STRICT)
class RecipePreprocessing(Preprocessing):
    """The card's preprocessing plus the number of context slices (2.5D input)."""

    context_slices: ContextSlices = 1


@dataclass(frozen=True, config=STRICT)
class RecipeLabel:
    """A label as a recipe writes it: its index is its position in ``[[labels]]``."""

    finding: Code
    name: Annotated[str, Field(min_length=1)] | None = None
    threshold: Probability = 0.5
    segment_category: Code | None = None
    segment_type: Code | None = None
    aggregation: Literal["max", "mean"] = "max"


@dataclass(frozen=True, config=STRICT)
class RecipeDocument:
    """The recipe TOML file as written (the JSON Schema's shape)."""

    bundle: BundleInfo
    model: dict[str, Any]
    preprocessing: RecipePreprocessing
    labels: Annotated[tuple[RecipeLabel, ...], Field(min_length=1)]
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    export: ExportSpec = field(default_factory=ExportSpec)

    @model_validator(mode="after")
    def _consistent(self) -> RecipeDocument:
        errors = label_errors(tuple(_label(i, d) for i, d in enumerate(self.labels)), self.task)
        if not isinstance(self.model.get("architecture"), str):
            errors.append("model.architecture must be a string")
        pad = self.preprocessing.pad_multiple
        if self.data.patch_size % pad:
            errors.append(f"data.patch_size must be a multiple of pad_multiple ({pad})")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def task(self) -> str:
        return self.bundle.task


def _label(index: int, d: RecipeLabel) -> Label:
    name = d.name or f"label{index}"
    return Label(
        index, name, d.threshold, d.finding, d.segment_category, d.segment_type, d.aggregation
    )


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


def parse_recipe(data: dict[str, Any], source: str = "") -> Recipe:
    """Validate a recipe dictionary (as read from TOML) into a :class:`Recipe`."""
    doc = validate_document(RecipeDocument, data, what="recipe", error=ConfigError)
    params = dict(doc.model)
    architecture = str(params.pop("architecture"))
    pre = doc.preprocessing
    preprocessing = Preprocessing(
        pre.window_min,
        pre.window_max,
        pre.normalisation,
        pre.mean,
        pre.std,
        pre.target_spacing_mm,
        pre.pad_multiple,
    )
    return Recipe(
        bundle=doc.bundle,
        architecture=architecture,
        model_params=params,
        preprocessing=preprocessing,
        context_slices=pre.context_slices,
        labels=tuple(_label(i, d) for i, d in enumerate(doc.labels)),
        data=doc.data,
        training=doc.training,
        export=doc.export,
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


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe TOML file (``docs/recipe.schema.json``)."""
    return json_schema(RecipeDocument, "dicomnode training recipe")
