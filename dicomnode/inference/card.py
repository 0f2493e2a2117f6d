"""Model bundle card: the versioned schema shared by training/export and the runtime.

A bundle is a folder with ``model.onnx`` and ``card.json``.  The card is validated in full
before a session is created (:mod:`dicomnode.schema`: types, ranges, codes, thresholds,
every error at once with its field path), then the sha256 of the model file is checked.
The classes here (``Code``, ``Preprocessing``, ``Label``) are also the training recipe's
(``models/recipe.py``), so a recipe and the card exported from it agree by construction.
The schema is documented in ``docs/model-bundles.md``; its JSON Schema is
``docs/card.schema.json`` (``dicomnode schema card``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from dicomnode.errors import ModelError
from dicomnode.schema import STRICT, json_schema, validate_document

CARD_SCHEMA: Literal["dicomnode.bundle/1"] = "dicomnode.bundle/1"
CARD_FILE = "card.json"
DISCLAIMER_PHRASE = "not for diagnostic use"

Task = Literal["segmentation", "classification"]
Probability = Annotated[float, Field(gt=0.0, lt=1.0)]


def check_context_slices(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("context_slices must be odd (the centre slice is predicted)")
    return value


#: An odd number of adjacent slices fed as channels (2.5D), the centre one predicted.
ContextSlices = Annotated[int, Field(ge=1, le=15), AfterValidator(check_context_slices)]


@dataclass(frozen=True, config=STRICT)
class Code:
    """A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True, config=STRICT)
class Preprocessing:
    window_min: float
    window_max: float
    normalisation: Literal["minmax", "zscore"] = "minmax"
    mean: float = 0.0
    std: Annotated[float, Field(gt=0)] = 1.0
    target_spacing_mm: Annotated[float, Field(gt=0)] | None = 1.0
    pad_multiple: Annotated[int, Field(ge=1)] = 16

    @model_validator(mode="after")
    def _window(self) -> Preprocessing:
        if self.window_max <= self.window_min:
            raise ValueError("window_max must exceed window_min")
        return self


@dataclass(frozen=True, config=STRICT)
class InputSpec:
    name: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    context_slices: ContextSlices = 1


@dataclass(frozen=True, config=STRICT)
class OutputSpec:
    name: str
    activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"
    layout: Literal["NCHW", "NHWC", "NC"] = "NCHW"


@dataclass(frozen=True, config=STRICT)
class Label:
    """One output channel.  Segmentation labels carry segment codes, all carry a finding."""

    index: Annotated[int, Field(ge=0)]
    name: Annotated[str, Field(min_length=1)]
    threshold: Probability
    finding: Code
    segment_category: Code | None = None
    segment_type: Code | None = None
    aggregation: Literal["max", "mean"] = "max"


def label_errors(labels: tuple[Label, ...], task: str, where: str = "labels") -> list[str]:
    """What a task needs of its labels: codes filled in; segment codes for segmentation."""
    errors = []
    for i, label in enumerate(labels):
        for name in ("finding", "segment_category", "segment_type"):
            code = getattr(label, name)
            if code is not None and not (code.value and code.scheme and code.meaning):
                errors.append(f"{where}[{i}].{name} needs value, scheme and meaning")
        if task == "segmentation" and (
            label.segment_category is None or label.segment_type is None
        ):
            errors.append(
                f"{where}[{i}] needs segment_category and segment_type (segmentation task)"
            )
    return errors


@dataclass(frozen=True, config=STRICT)
class ModelCard:
    name: Annotated[str, Field(min_length=1)]
    version: Annotated[str, Field(min_length=1)]
    task: Task
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    opset: Annotated[int, Field(ge=7, le=25)]
    input: InputSpec
    preprocessing: Preprocessing
    output: OutputSpec
    labels: Annotated[tuple[Label, ...], Field(min_length=1)]
    intended_use: Annotated[str, Field(min_length=1)]
    disclaimer: str
    model_file: str = "model.onnx"
    description: str = ""
    manufacturer: str = "dicomnode"
    min_component_volume_mm3: Annotated[float, Field(ge=0)] = 0.0
    training_data: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: Literal["dicomnode.bundle/1"] = CARD_SCHEMA

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        errors = label_errors(self.labels, self.task)
        if sorted(lb.index for lb in self.labels) != list(range(len(self.labels))):
            errors.append("labels[].index must number the channels 0..n-1")
        if DISCLAIMER_PHRASE not in self.disclaimer.lower():
            errors.append(f"disclaimer must state '{DISCLAIMER_PHRASE}'")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; absent optional codes are left out (not written as null)."""
        data = dataclasses.asdict(self)
        for label in data["labels"]:
            for key in ("segment_category", "segment_type"):
                if label[key] is None:
                    del label[key]
        return data


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk."""

    path: Path
    card: ModelCard

    @property
    def model_path(self) -> Path:
        return self.path / self.card.model_file


def parse_card(data: Any) -> ModelCard:
    """Validate a card dictionary (as read from JSON) into a :class:`ModelCard`.

    Raises :class:`ModelError` listing every problem, each naming its field."""
    if isinstance(data, dict) and data.get("schema", CARD_SCHEMA) != CARD_SCHEMA:
        raise ModelError(
            f"card field 'schema' is {data['schema']!r}; this runtime reads {CARD_SCHEMA!r}"
        )
    return validate_document(ModelCard, data, what="model card", error=ModelError)


def card_schema() -> dict[str, Any]:
    """The JSON Schema of ``card.json`` (``docs/card.schema.json``)."""
    return json_schema(ModelCard, "dicomnode model bundle card")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_card(bundle_dir: Path, card: ModelCard) -> Path:
    """Write ``card.json`` (used by the exporter; the runtime only reads)."""
    path = bundle_dir / CARD_FILE
    path.write_text(json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_bundle(path: Path) -> Bundle:
    """Read and validate a bundle folder; refuse it if the card or the model hash is wrong."""
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise ModelError(f"model bundle {path} has no {CARD_FILE}")
    try:
        data = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{card_path} is not valid JSON: {exc}") from exc
    try:
        card = parse_card(data)
    except ModelError as exc:
        raise ModelError(f"model bundle {path}: {exc}") from None
    model = path / card.model_file
    if not model.is_file():
        raise ModelError(f"model bundle {path}: model file {card.model_file} is missing")
    actual = sha256_file(model)
    if actual != card.sha256:
        raise ModelError(
            f"model bundle {path}: sha256 of {card.model_file} is {actual}, card says {card.sha256}"
        )
    return Bundle(path=path, card=card)
