"""Train -> export -> parity -> runtime bundle load -> inference, on tiny phantom data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf

from dicomnode.converters.export import default_parity_inputs, export_checkpoint, write_bundle
from dicomnode.inference.card import load_bundle
from dicomnode.inference.preprocess import prepare_slices, restore_slices
from dicomnode.models.architectures import build_classifier
from dicomnode.models.cli import evaluate_main, export_main, train_main
from dicomnode.models.data import (
    PatchSampler,
    augment,
    fill_value,
    load_cases,
    prepare_case,
    slice_dataset,
    training_dataset,
)
from dicomnode.models.run import RunFiles
from dicomnode.synthetic.phantom import Lesion, generate_phantom

pytestmark = [
    pytest.mark.train,
    # Keras' own weight saving trips numpy 2's copy-keyword deprecation; not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def seg_run(
    tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, make_recipe: Callable[..., Any]
) -> Path:
    """A two-step training run of the (shrunk) segmentation recipe through the CLI."""
    folder = tmp_path_factory.mktemp("runs")
    recipe = folder / "tiny_seg.toml"
    recipe.write_text(make_recipe("lesion_seg").source)
    out = folder / "seg"
    assert train_main([str(recipe), "--data", str(tiny_data), "--out", str(out)]) == 0
    return out


def test_training_run_writes_checkpoints_logs_and_evaluation(seg_run: Path) -> None:
    run = RunFiles(seg_run)
    for path in (run.best, run.last, run.training, run.heldout, run.metrics):
        assert path.is_file(), path
    assert any(run.tensorboard.rglob("events.out.tfevents.*"))
    info = json.loads(run.training.read_text())
    assert info["epochs_run"] == 1 and info["wall_time_s"] > 0
    assert "val_loss" in info["history"]
    metrics = json.loads(run.metrics.read_text())
    assert metrics["task"] == "segmentation"
    assert (run.evaluation / "overlays.png").stat().st_size > 0


def test_export_parity_load_and_infer_on_a_phantom(
    seg_run: Path, tmp_path: Path, make_spec: Callable[..., Any]
) -> None:
    # Given a trained checkpoint, when it is exported through the CLI
    bundle_dir = tmp_path / "bundle"
    assert export_main([str(seg_run), "--out", str(bundle_dir)]) == 0
    # then the runtime's loader accepts the bundle and the card records parity and opset
    bundle = load_bundle(bundle_dir)
    card = bundle.card
    assert card.opset == 17 and card.input.layout == "NCHW" and card.output.layout == "NCHW"
    assert card.parity["passed"] and card.parity["max_abs_diff"] <= card.parity["tolerance"]
    assert card.provenance["tensorflow"] == tf.__version__ and card.provenance["seed"]
    assert "not for diagnostic use" in card.disclaimer.lower()
    # and ONNX Runtime runs it on a phantom the way the node does.
    lesion = Lesion(center_mm=(70.0, -5.0, 0.0), radius_mm=14.0, hu=40.0)
    phantom = generate_phantom(make_spec(9, (lesion,), rows=72, columns=60))
    x, geometry = prepare_slices(phantom.hu, phantom.spec.pixel_spacing, card.preprocessing)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    (y,) = session.run([card.output.name], {card.input.name: x[:, None]})
    assert y.shape == (x.shape[0], 1, *x.shape[1:])
    assert np.all((y >= 0) & (y <= 1))
    assert restore_slices(y[:, 0], geometry).shape == phantom.hu.shape


def test_evaluate_a_bundle_with_onnx_runtime(
    seg_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    bundle_dir = tmp_path / "bundle"
    export_checkpoint(seg_run, bundle_dir)
    assert (
        evaluate_main([str(bundle_dir), "--data", str(tiny_data), "--out", str(tmp_path / "eval")])
        == 0
    )
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["summary"]["cases"] == 4 and len(result["cases"]) == 4


def test_classifier_bundle_outputs_slice_probabilities(
    tiny_data: Path, tmp_path: Path, make_recipe: Callable[..., Any]
) -> None:
    recipe = make_recipe("lesion_cls")
    model = build_classifier(base_filters=4, depth=2)
    rng = np.random.default_rng(0)
    held_out = rng.uniform(0, 1, (4, 64, 64, 1)).astype(np.float32)
    bundle = write_bundle(
        model, tmp_path / "cls", recipe=recipe, parity_inputs=default_parity_inputs(held_out)
    )
    card = load_bundle(bundle.path).card
    assert card.task == "classification" and card.output.layout == "NC"
    case = load_cases(tiny_data, recipe.labels)[0]
    x, _ = prepare_slices(case.hu, case.pixel_spacing, card.preprocessing)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    (y,) = session.run([card.output.name], {card.input.name: x[:, None]})
    assert y.shape == (len(x), 1) and np.all((y >= 0) & (y <= 1))


def test_tf_data_slices_equal_the_runtime_preprocessing(
    tiny_data: Path, make_recipe: Callable[..., Any]
) -> None:
    recipe = make_recipe("lesion_seg", preprocessing={"target_spacing_mm": 3.7})
    case = load_cases(tiny_data, recipe.labels)[1]
    expected, _ = prepare_slices(case.hu, case.pixel_spacing, recipe.preprocessing)
    prepared = prepare_case(case, recipe.preprocessing)
    got = np.concatenate([b.numpy() for b in slice_dataset(prepared, context=1)])
    assert expected.shape[1:] == (96, 96)  # 64 px * 5 mm / 3.7 mm = 86 -> padded to 96
    np.testing.assert_array_equal(got[..., 0], expected)
    # 2.5D stacks carry the neighbours, edges repeated.
    stacks = np.concatenate([b.numpy() for b in slice_dataset(prepared, context=3)])
    np.testing.assert_array_equal(stacks[1:, ..., 0], expected[:-1])
    np.testing.assert_array_equal(stacks[0, ..., 0], expected[0])


def test_training_stream_is_deterministic_and_binary(
    tiny_data: Path, make_recipe: Callable[..., Any]
) -> None:
    recipe = make_recipe("lesion_seg", data={"soft_labels": False})
    prepared = [prepare_case(c, recipe.preprocessing) for c in load_cases(tiny_data, recipe.labels)]

    def first_batches(seed: int) -> list[np.ndarray]:
        sampler = PatchSampler(
            prepared,
            task="segmentation",
            patch_size=32,
            context=1,
            positive_fraction=0.5,
            min_area_mm2=0.0,
            fill=fill_value(recipe.preprocessing),
        )
        batches = training_dataset(sampler, recipe, seed).take(2)
        return [a.numpy() for xy in batches for a in xy]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, v) for u, v in zip(a, c, strict=True))
    assert set(np.unique(a[1])) <= {0.0, 1.0}


def test_augmentation_moves_image_and_label_together(make_recipe: Callable[..., Any]) -> None:
    recipe = make_recipe(
        "lesion_seg", data={"intensity_jitter": 0.0, "rotation_deg": 8.0, "soft_labels": False}
    )
    y = np.zeros((32, 32, 1), np.float32)
    y[5:15, 8:20] = 1.0
    x = y * 0.75  # the image is its own label
    for s in range(6):
        xa, ya = augment(
            tf.constant(x),
            tf.constant(y),
            tf.constant([3, s], tf.int64),
            task="segmentation",
            data=recipe.data,
            fill=0.0,
        )
        np.testing.assert_array_equal(ya.numpy(), (xa.numpy() >= 0.375).astype(np.float32))


def test_same_seed_same_weights(seg_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    import keras

    from dicomnode.models.recipe import load_recipe
    from dicomnode.models.train import train

    # Given the module's run, when the same recipe trains again on the same data
    train(load_recipe(RunFiles(seg_run).recipe), tiny_data, tmp_path / "again")
    # then every weight is bit-identical.
    first, again = (
        keras.saving.load_model(RunFiles(p).last, compile=False).get_weights()
        for p in (seg_run, tmp_path / "again")
    )
    for u, v in zip(first, again, strict=True):
        np.testing.assert_array_equal(u, v)


def test_soft_labels_stay_soft_through_augmentation(make_recipe: Callable[..., Any]) -> None:
    recipe = make_recipe("lesion_seg", data={"soft_labels": True, "rotation_deg": 8.0})
    y = np.zeros((32, 32, 1), np.float32)
    y[10:16, 10:16] = 1.0
    y[16, 10:16] = 0.3  # partial coverage on the edge
    _, ya = augment(
        tf.constant(y),
        tf.constant(y),
        tf.constant([3, 1], tf.int64),
        task="segmentation",
        data=recipe.data,
        fill=0.0,
    )
    fractional = (ya.numpy() > 0.05) & (ya.numpy() < 0.95)
    assert fractional.sum() >= 4 and ya.numpy().max() <= 1.0
