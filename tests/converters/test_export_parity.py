"""The exporter's parity gate: it refuses to write a bundle whose ONNX graph drifts from TF."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf  # noqa: F401  (the train extra; imported first for clear failures)

from dicomnode.converters import export
from dicomnode.converters.parity import ParityError, check_parity, measure_parity
from dicomnode.inference.card import load_bundle
from dicomnode.models.architectures import build_unet
from dicomnode.models.recipe import load_recipe, parse_recipe

pytestmark = pytest.mark.train

RNG = np.random.default_rng(7)
INPUTS = [
    RNG.uniform(0, 1, (2, 32, 48, 1)).astype(np.float32),
    RNG.uniform(0, 1, (1, 64, 16, 1)).astype(np.float32),
]


def small_recipe(**export_section: float) -> object:
    data = tomllib.loads(load_recipe("lesion_seg").source)
    data["export"].update(export_section)
    return parse_recipe(data, source="# test recipe\n")


def perturbed(model: object) -> object:
    other = build_unet(base_filters=4, depth=2)
    other.set_weights([w + 0.05 for w in model.get_weights()])
    return other


def test_parity_passes_for_the_converted_model() -> None:
    model = build_unet(base_filters=4, depth=2)
    proto = export.convert_keras(model, opset=17, task="segmentation")
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    report = check_parity(
        model,
        proto.SerializeToString(),
        INPUTS,
        input_name="image",
        input_layout="NCHW",
        output_layout="NCHW",
        tolerance=1e-4,
    )
    assert report.passed and report.max_abs_diff < 1e-5 and report.inputs == 2


def test_parity_refuses_another_models_graph() -> None:
    model = build_unet(base_filters=4, depth=2)
    onnx_bytes = export.convert_keras(model, opset=17, task="segmentation").SerializeToString()
    with pytest.raises(ParityError, match="exceeds tolerance"):
        check_parity(
            perturbed(model),
            onnx_bytes,
            INPUTS,
            input_name="image",
            input_layout="NCHW",
            output_layout="NCHW",
            tolerance=1e-4,
        )


def test_exporter_writes_nothing_when_parity_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a converter whose graph does not match the Keras model (a perturbed copy)
    model = build_unet(base_filters=4, depth=2)
    real_convert = export.convert_keras
    monkeypatch.setattr(export, "convert_keras", lambda m, **kw: real_convert(perturbed(m), **kw))
    out = tmp_path / "bundle"
    # when the bundle is exported, then it is refused and no file is left behind.
    with pytest.raises(ParityError):
        export.write_bundle(model, out, recipe=small_recipe(), parity_inputs=INPUTS)
    assert not out.exists() or not any(out.iterdir())


def test_impossible_tolerance_is_refused_and_recorded_when_met(tmp_path: Path) -> None:
    model = build_unet(base_filters=4, depth=2)
    report = measure_parity(
        model,
        export.convert_keras(model, task="segmentation").SerializeToString(),
        INPUTS,
        input_name="image",
        input_layout="NCHW",
        output_layout="NCHW",
        tolerance=0.0,
    )
    if report.max_abs_diff > 0:  # float reordering between TF and ORT: tolerance 0 fails
        with pytest.raises(ParityError):
            export.write_bundle(
                model, tmp_path / "zero", recipe=small_recipe(tolerance=0.0), parity_inputs=INPUTS
            )
    bundle = export.write_bundle(
        model, tmp_path / "ok", recipe=small_recipe(tolerance=1e-4), parity_inputs=INPUTS
    )
    card = load_bundle(bundle.path).card
    assert card.parity["tolerance"] == 1e-4 and card.parity["passed"] is True
    assert onnx.load(str(bundle.model_path)).graph.output[0].name == card.output.name


def test_the_no_op_crops_after_upsampling_are_removed_and_nothing_changes() -> None:
    # Given a U-Net with two upsamplings, converted by tf2onnx (a Slice + Pad after each)
    model = build_unet(base_filters=4, depth=2)
    proto = export.convert_keras(model, opset=17, task="segmentation")
    before = proto.SerializeToString()
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("ConvTranspose") == 2 and ops.count("Pad") == 2
    # When the crops are dropped
    assert export.drop_noop_crops(proto) == 2
    # Then no Pad, Slice or shape arithmetic is left, and the outputs are the same bit for bit
    ops = [n.op_type for n in proto.graph.node]
    assert not {"Pad", "Slice", "Shape"} & set(ops) and ops.count("ConvTranspose") == 2
    onnx.checker.check_model(proto)
    after = proto.SerializeToString()
    x = RNG.uniform(0, 1, (2, 1, 48, 80)).astype(np.float32)
    runs = [
        ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
        for m in (before, after)
    ]
    assert np.array_equal(runs[0], runs[1])
    # and a graph without such crops is left alone
    assert export.drop_noop_crops(proto) == 0
