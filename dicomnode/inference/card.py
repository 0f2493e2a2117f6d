"""Model bundle card: the versioned schema shared by training/export and the runtime.

A bundle is a folder with ``model.onnx`` and ``card.json``.  The card is validated in full
before a session is created (schema, codes, thresholds, sha256 of the model file); every
error names the offending field.  The schema is documented in ``docs/model-bundles.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dicomnode.errors import ModelError

CARD_SCHEMA = "dicomnode.bundle/1"
CARD_FILE = "card.json"
DISCLAIMER_PHRASE = "not for diagnostic use"


@dataclass(frozen=True)
class Code:
    """A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Preprocessing:
    window_min: float = -1000.0
    window_max: float = 1000.0
    normalisation: Literal["minmax", "zscore"] = "minmax"
    mean: float = 0.0
    std: float = 1.0
    target_spacing_mm: float | None = 1.0
    pad_multiple: int = 16


@dataclass(frozen=True)
class InputSpec:
    name: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: str = "float32"
    context_slices: int = 1


@dataclass(frozen=True)
class OutputSpec:
    name: str
    activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"
    layout: Literal["NCHW", "NHWC", "NC"] = "NCHW"


@dataclass(frozen=True)
class Label:
    """One output channel.  Segmentation labels carry segment codes, all carry a finding."""

    index: int
    name: str
    threshold: float
    finding: Code
    segment_category: Code | None = None
    segment_type: Code | None = None
    aggregation: Literal["max", "mean"] = "max"


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    task: Literal["segmentation", "classification"]
    model_file: str
    sha256: str
    opset: int
    input: InputSpec
    preprocessing: Preprocessing
    output: OutputSpec
    labels: tuple[Label, ...]
    intended_use: str
    disclaimer: str
    description: str = ""
    manufacturer: str = "dicomnode"
    min_component_volume_mm3: float = 0.0
    training_data: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: str = CARD_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; absent optional codes are left out (not written as null)."""
        data = asdict(self)
        for label in data["labels"]:
            for key in ("segment_category", "segment_type"):
                if label[key] is None:
                    del label[key]
        return data


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk."""

    path: Path
    card: ModelCard

    @property
    def model_path(self) -> Path:
        return self.path / self.card.model_file


def _req(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ModelError(f"card field '{where}{key}' is missing")
    value = d[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ModelError(f"card field '{where}{key}' has the wrong type")
    if not isinstance(value, kind):
        raise ModelError(f"card field '{where}{key}' has the wrong type: {type(value).__name__}")
    return value


def _no_unknown(d: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ModelError(f"unknown card field(s) {', '.join(where + u for u in unknown)}")


def parse_code(d: Any, where: str) -> Code:
    if not isinstance(d, dict):
        raise ModelError(f"card field '{where}' must be a table with value, scheme, meaning")
    _no_unknown(d, {"value", "scheme", "meaning"}, where + ".")
    return Code(
        value=_req(d, "value", str, where + "."),
        scheme=_req(d, "scheme", str, where + "."),
        meaning=_req(d, "meaning", str, where + "."),
    )


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> Any:
    if value not in allowed:
        raise ModelError(f"card field '{where}' must be one of {', '.join(allowed)}, not {value!r}")
    return value


def parse_preprocessing(d: dict[str, Any]) -> Preprocessing:
    w = "preprocessing."
    _no_unknown(d, set(Preprocessing.__dataclass_fields__), w)
    p = Preprocessing(
        window_min=float(_req(d, "window_min", (int, float), w)),
        window_max=float(_req(d, "window_max", (int, float), w)),
        normalisation=_choice(
            d.get("normalisation", "minmax"), ("minmax", "zscore"), w + "normalisation"
        ),
        mean=float(d.get("mean", 0.0)),
        std=float(d.get("std", 1.0)),
        target_spacing_mm=(
            None if d.get("target_spacing_mm") is None else float(d["target_spacing_mm"])
        ),
        pad_multiple=int(d.get("pad_multiple", 16)),
    )
    if p.window_max <= p.window_min:
        raise ModelError("card field 'preprocessing.window_max' must exceed window_min")
    if p.std <= 0:
        raise ModelError("card field 'preprocessing.std' must be positive")
    if p.target_spacing_mm is not None and p.target_spacing_mm <= 0:
        raise ModelError("card field 'preprocessing.target_spacing_mm' must be positive")
    if p.pad_multiple < 1:
        raise ModelError("card field 'preprocessing.pad_multiple' must be >= 1")
    return p


def _label(d: Any, i: int, task: str) -> Label:
    w = f"labels[{i}]."
    if not isinstance(d, dict):
        raise ModelError(f"card field 'labels[{i}]' must be a table")
    _no_unknown(d, set(Label.__dataclass_fields__), w)
    threshold = float(_req(d, "threshold", (int, float), w))
    if not 0.0 < threshold < 1.0:
        raise ModelError(f"card field '{w}threshold' must be in (0, 1)")
    label = Label(
        index=int(_req(d, "index", int, w)),
        name=_req(d, "name", str, w),
        threshold=threshold,
        finding=parse_code(_req(d, "finding", dict, w), w + "finding"),
        segment_category=None
        if d.get("segment_category") is None
        else parse_code(d["segment_category"], w + "segment_category"),
        segment_type=None
        if d.get("segment_type") is None
        else parse_code(d["segment_type"], w + "segment_type"),
        aggregation=_choice(d.get("aggregation", "max"), ("max", "mean"), w + "aggregation"),
    )
    if task == "segmentation" and (label.segment_category is None or label.segment_type is None):
        raise ModelError(f"card field '{w}segment_category/segment_type' required for segmentation")
    return label


def parse_card(data: Any) -> ModelCard:
    """Validate a card dictionary (as read from JSON) into a :class:`ModelCard`."""
    if not isinstance(data, dict):
        raise ModelError("card must be a JSON object")
    _no_unknown(data, set(ModelCard.__dataclass_fields__), "")
    schema = data.get("schema", CARD_SCHEMA)
    if schema != CARD_SCHEMA:
        raise ModelError(f"card field 'schema' is {schema!r}; this runtime reads {CARD_SCHEMA!r}")
    task = _choice(_req(data, "task", str, ""), ("segmentation", "classification"), "task")
    inp = _req(data, "input", dict, "")
    _no_unknown(inp, set(InputSpec.__dataclass_fields__), "input.")
    out = _req(data, "output", dict, "")
    _no_unknown(out, set(OutputSpec.__dataclass_fields__), "output.")
    labels_raw = _req(data, "labels", list, "")
    if not labels_raw:
        raise ModelError("card field 'labels' must list at least one label")
    labels = tuple(_label(d, i, task) for i, d in enumerate(labels_raw))
    if sorted(lb.index for lb in labels) != list(range(len(labels))):
        raise ModelError("card field 'labels[].index' must number the channels 0..n-1")
    sha = _req(data, "sha256", str, "")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelError("card field 'sha256' must be 64 lower-case hex digits")
    disclaimer = _req(data, "disclaimer", str, "")
    if DISCLAIMER_PHRASE not in disclaimer.lower():
        raise ModelError(f"card field 'disclaimer' must state '{DISCLAIMER_PHRASE}'")
    opset = int(_req(data, "opset", int, ""))
    if not 7 <= opset <= 25:
        raise ModelError("card field 'opset' is out of range")
    return ModelCard(
        name=_req(data, "name", str, ""),
        version=_req(data, "version", str, ""),
        task=task,
        model_file=data.get("model_file", "model.onnx"),
        sha256=sha,
        opset=opset,
        input=InputSpec(
            name=_req(inp, "name", str, "input."),
            layout=_choice(inp.get("layout", "NCHW"), ("NCHW", "NHWC"), "input.layout"),
            dtype=_choice(inp.get("dtype", "float32"), ("float32",), "input.dtype"),
            context_slices=int(inp.get("context_slices", 1)),
        ),
        preprocessing=parse_preprocessing(_req(data, "preprocessing", dict, "")),
        output=OutputSpec(
            name=_req(out, "name", str, "output."),
            activation=_choice(
                out.get("activation", "sigmoid"),
                ("sigmoid", "softmax", "none"),
                "output.activation",
            ),
            layout=_choice(out.get("layout", "NCHW"), ("NCHW", "NHWC", "NC"), "output.layout"),
        ),
        labels=labels,
        intended_use=_req(data, "intended_use", str, ""),
        disclaimer=disclaimer,
        description=str(data.get("description", "")),
        manufacturer=str(data.get("manufacturer", "dicomnode")),
        min_component_volume_mm3=float(data.get("min_component_volume_mm3", 0.0)),
        training_data=str(data.get("training_data", "")),
        metrics=dict(data.get("metrics", {})),
        parity=dict(data.get("parity", {})),
        provenance=dict(data.get("provenance", {})),
    )


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
    card = parse_card(data)
    model = path / card.model_file
    if not model.is_file():
        raise ModelError(f"model bundle {path}: model file {card.model_file} is missing")
    actual = sha256_file(model)
    if actual != card.sha256:
        raise ModelError(
            f"model bundle {path}: sha256 of {card.model_file} is {actual}, card says {card.sha256}"
        )
    return Bundle(path=path, card=card)
