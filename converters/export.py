"""Export a trained Keras model to a model bundle (``model.onnx`` + ``card.json``).

tf2onnx is called directly (``tf2onnx.convert.from_keras``), not Keras' own ONNX export.
The graph takes NCHW input (``inputs_as_nchw``) with dynamic batch, height and width;
segmentation output is NCHW as well, classification output is (N, C).  Nothing is written
unless the TF-vs-ONNX parity check passes; the card then records the opset, the parity
result, the metrics and the provenance.  The card schema is ``dicomnode.inference.card``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from dicomnode.converters.parity import check_parity
from dicomnode.inference.card import (
    CARD_FILE,
    Bundle,
    InputSpec,
    ModelCard,
    OutputSpec,
    load_bundle,
)
from dicomnode.models.recipe import Recipe

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"


def _name_dims(value_info: Any, names: Sequence[str | int]) -> None:
    """Give the graph's dynamic axes readable names (``batch``, ``height``, ``width``)."""
    dims = value_info.type.tensor_type.shape.dim
    for dim, name in zip(dims, names, strict=True):
        if isinstance(name, str):
            dim.ClearField("dim_value")
            dim.dim_param = name


def convert_keras(model: Any, *, opset: int = DEFAULT_OPSET, task: str) -> Any:
    """Convert a channels-last Keras model to an ONNX ``ModelProto`` with tf2onnx.

    The input becomes NCHW ``(batch, C, height, width)``; a segmentation output becomes NCHW
    ``(batch, classes, height, width)``, a classification output stays ``(batch, classes)``.
    """
    import tensorflow as tf
    import tf2onnx

    input_name = model.inputs[0].name.split(":")[0]
    output_name = model.output_names[0] if hasattr(model, "output_names") else None
    channels = int(model.inputs[0].shape[-1])
    spec = (tf.TensorSpec((None, None, None, channels), tf.float32, name=input_name),)
    proto, _ = tf2onnx.convert.from_keras(
        model,
        input_signature=spec,
        opset=opset,
        inputs_as_nchw=[input_name],
        outputs_as_nchw=[output_name] if task == "segmentation" and output_name else None,
    )
    graph_in = proto.graph.input[0]
    graph_out = proto.graph.output[0]
    if graph_in.name != input_name:
        raise RuntimeError(f"tf2onnx named the input {graph_in.name!r}, expected {input_name!r}")
    _name_dims(graph_in, ["batch", channels, "height", "width"])
    classes = int(model.outputs[0].shape[-1])
    if task == "segmentation":
        _name_dims(graph_out, ["batch", classes, "height", "width"])
    else:
        _name_dims(graph_out, ["batch", classes])
    proto.doc_string = f"{model.name}: exported by dicomnode.converters with tf2onnx"
    return proto


def _attributes(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _exact_upsampling(node: Any) -> bool:
    """A ConvTranspose whose output is exactly ``stride`` times its input: kernel equal to
    the stride, no padding, output padding, output shape or dilation."""
    if node.op_type != "ConvTranspose":
        return False
    attrs = _attributes(node)
    strides, kernel = list(attrs.get("strides", [])), list(attrs.get("kernel_shape", []))
    return (
        bool(strides)
        and strides == kernel
        and not any(attrs.get("pads", []))
        and not any(attrs.get("output_padding", []))
        and "output_shape" not in attrs
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        and all(d == 1 for d in attrs.get("dilations", [1]))
    )


def drop_noop_crops(proto: Any) -> int:
    """Remove the Slice + Pad that tf2onnx puts after each ``Conv2DTranspose(padding="same")``
    to bring ONNX's output size to TensorFlow's, where the two are equal (kernel = stride:
    ``(n - 1) * s + k = n * s``), and the shape arithmetic that fed them; returns the crops
    removed.  The outputs do not change (the export's parity check runs on the result);
    ONNX Runtime could not fold them, the sizes being dynamic, and they cost it two copies
    of each upsampled tensor (about 6 % of the U-Net's time on the CPU)."""
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed = 0
    for pad in list(graph.node):
        if pad.op_type != "Pad" or _attributes(pad).get("mode", b"constant") not in (
            b"constant",
            "constant",
        ):
            continue
        crop = producer.get(pad.input[0])
        if crop is None or crop.op_type != "Slice" or len(consumers[crop.output[0]]) != 1:
            continue
        upsampling = producer.get(crop.input[0])
        if upsampling is None or not _exact_upsampling(upsampling):
            continue
        if any(output.name == pad.output[0] for output in graph.output):
            continue  # a graph output keeps its name
        for node in consumers.get(pad.output[0], []):
            for k, name in enumerate(node.input):
                if name == pad.output[0]:
                    node.input[k] = upsampling.output[0]
        removed += 1
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(list(graph.node)):  # topological order: consumers come later
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return removed


def card_json(card: ModelCard) -> str:
    """The card as JSON, leaving out optional label codes that are not set.

    ``ModelCard.to_dict`` writes an unset ``segment_category`` / ``segment_type`` as
    ``null``, which ``parse_card`` rejects; the schema means "absent", so omit them.
    """
    data = card.to_dict()
    for label in data["labels"]:
        for key in ("segment_category", "segment_type"):
            if label.get(key) is None:
                label.pop(key, None)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(recipe: Recipe, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, recipe, seed and commit that produced a bundle."""
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    try:
        import keras

        keras_version = keras.__version__
    except ImportError:  # pragma: no cover - keras ships with tensorflow
        keras_version = None
    info: dict[str, Any] = {
        "tensorflow": tf.__version__,
        "keras": keras_version,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "recipe_name": recipe.bundle.name,
        "recipe_sha256": hashlib.sha256(recipe.source.encode()).hexdigest(),
        "recipe": recipe.source,
        "seed": recipe.training.seed,
        "git_commit": _git_commit(),
        "exported_at": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
    }
    if extra:
        info.update(extra)
    return info


def _card_task(task: str) -> Literal["segmentation", "classification"]:
    """The recipe's task as the card's type (recipes are validated to one of the two)."""
    if task == "segmentation":
        return "segmentation"
    if task == "classification":
        return "classification"
    raise ValueError(f"recipe task must be 'segmentation' or 'classification', not {task!r}")


def build_card(
    recipe: Recipe,
    *,
    sha256: str,
    opset: int,
    input_name: str,
    output_name: str,
    metrics: dict[str, Any],
    parity: dict[str, Any],
    training_data: str,
    provenance_info: dict[str, Any],
) -> ModelCard:
    """Fill the card from the recipe and the export results."""
    b = recipe.bundle
    return ModelCard(
        name=b.name,
        version=b.version,
        task=_card_task(b.task),
        model_file=MODEL_FILE,
        sha256=sha256,
        opset=opset,
        input=InputSpec(name=input_name, layout="NCHW", context_slices=recipe.context_slices),
        preprocessing=recipe.preprocessing,
        output=OutputSpec(
            name=output_name,
            activation="sigmoid",
            layout="NCHW" if b.task == "segmentation" else "NC",
        ),
        labels=recipe.labels,
        intended_use=b.intended_use,
        disclaimer=b.disclaimer,
        description=b.description,
        min_component_volume_mm3=b.min_component_volume_mm3,
        training_data=training_data,
        metrics=metrics,
        parity=parity,
        provenance=provenance_info,
    )


def write_bundle(
    model: Any,
    out_dir: str | Path,
    *,
    recipe: Recipe,
    parity_inputs: Sequence[npt.NDArray[np.float32]],
    metrics: dict[str, Any] | None = None,
    training_data: str = "",
    extra_provenance: dict[str, Any] | None = None,
    tolerance: float | None = None,
    opset: int | None = None,
) -> Bundle:
    """Convert ``model``, check parity on ``parity_inputs`` (NHWC batches), write the bundle.

    Raises :class:`~dicomnode.converters.parity.ParityError` (and writes nothing) when the
    ONNX graph's outputs differ from TensorFlow's by more than ``tolerance``.
    """
    opset = recipe.export.opset if opset is None else opset
    tolerance = recipe.export.tolerance if tolerance is None else tolerance
    task = recipe.bundle.task
    proto = convert_keras(model, opset=opset, task=task)
    crops = drop_noop_crops(proto)
    if crops:
        log.info("removed %d no-op crop(s) after transposed convolutions", crops)
    onnx_bytes = proto.SerializeToString()
    input_name = proto.graph.input[0].name
    output_name = proto.graph.output[0].name
    report = check_parity(
        model,
        onnx_bytes,
        parity_inputs,
        input_name=input_name,
        input_layout="NCHW",
        output_layout="NCHW" if task == "segmentation" else "NC",
        tolerance=tolerance,
    )
    log.info("parity ok: max abs diff %.3g (tolerance %.3g)", report.max_abs_diff, tolerance)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = build_card(
        recipe,
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        opset=opset,
        input_name=input_name,
        output_name=output_name,
        metrics=metrics or {},
        parity=report.to_dict(),
        training_data=training_data,
        provenance_info=provenance(recipe, extra_provenance),
    )
    tmp_model = out / (MODEL_FILE + ".tmp")
    tmp_model.write_bytes(onnx_bytes)
    os.replace(tmp_model, out / MODEL_FILE)
    tmp_card = out / (CARD_FILE + ".tmp")
    tmp_card.write_text(card_json(card))
    os.replace(tmp_card, out / CARD_FILE)
    bundle = load_bundle(out)
    log.info("wrote bundle %s (%s, %d bytes)", out, card.name, len(onnx_bytes))
    return bundle


def default_parity_inputs(
    heldout: npt.NDArray[np.float32], seed: int = 0
) -> list[npt.NDArray[np.float32]]:
    """Held-out slices plus a batch at another size, to exercise the dynamic axes."""
    rng = np.random.default_rng(seed)
    inputs = [heldout[i : i + 4] for i in range(0, min(len(heldout), 8), 4)]
    channels = heldout.shape[-1]
    inputs.append(rng.uniform(0.0, 1.0, size=(3, 48, 80, channels)).astype(np.float32))
    return inputs


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tolerance: float | None = None,
    opset: int | None = None,
) -> Bundle:
    """Export a training run (its folder or its ``model.keras``) as a bundle."""
    import keras

    from dicomnode.models.recipe import parse_recipe
    from dicomnode.models.run import RunFiles

    run = RunFiles.locate(checkpoint)
    recipe = parse_recipe(run.read_recipe_dict(), source=run.recipe.read_text())
    model = keras.saving.load_model(run.checkpoint_path(checkpoint), compile=False)
    training = json.loads(run.training.read_text()) if run.training.is_file() else {}
    metrics = json.loads(run.metrics.read_text()) if run.metrics.is_file() else {}
    heldout = np.load(run.heldout)["inputs"].astype(np.float32)
    extra = {
        "training_wall_time_s": training.get("wall_time_s"),
        "epochs_run": training.get("epochs_run"),
        "best_epoch": training.get("best_epoch"),
        "best_val_loss": training.get("best_val_loss"),
        "parameters": int(model.count_params()),
    }
    return write_bundle(
        model,
        out_dir,
        recipe=recipe,
        parity_inputs=default_parity_inputs(heldout, recipe.training.seed),
        metrics=metrics.get("summary", metrics),
        training_data=training.get("data_description", ""),
        extra_provenance=extra,
        tolerance=tolerance,
        opset=opset,
    )
