"""Model bundles: card validation, hash check, providers, batched slice-wise inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicomnode.errors import ModelError
from dicomnode.inference.card import Preprocessing, load_bundle
from dicomnode.inference.preprocess import prepare_slices, restore_slices
from dicomnode.inference.runner import BundleRunner, choose_providers
from fixtures_models import max_classifier, threshold_segmenter


def edit_card(bundle: Path, **changes: object) -> None:
    card = json.loads((bundle / "card.json").read_text())
    card.update(changes)
    (bundle / "card.json").write_text(json.dumps(card))


def test_bundle_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    bundle = threshold_segmenter(tmp_path / "b")
    with (bundle / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"disclaimer": "Use freely."}, "disclaimer"),
        ({"task": "detection"}, "task"),
        ({"colour": "red"}, "colour"),
        ({"labels": []}, "labels"),
        ({"labels": [{"index": 0, "name": "x", "threshold": 1.5, "finding": {}}]}, "threshold"),
        ({"preprocessing": {"window_min": 10, "window_max": 0}}, "window_max"),
        ({"schema": "dicomnode.bundle/99"}, "schema"),
        ({"input": {"name": "image", "layout": "NDHWC"}}, "input.layout"),
    ],
)
def test_bad_card_is_refused_naming_the_field(
    tmp_path: Path, changes: dict[str, object], field: str
) -> None:
    bundle = threshold_segmenter(tmp_path / "b")
    edit_card(bundle, **changes)
    with pytest.raises(ModelError, match=field):
        load_bundle(bundle)


def test_cpu_is_always_last_and_tensorrt_only_when_asked() -> None:
    chosen = choose_providers(["cuda", "cpu"])
    assert chosen[-1] == "CPUExecutionProvider"
    assert "TensorrtExecutionProvider" not in chosen


def test_segmentation_runs_in_batches_and_maps_back_to_source_grid(tmp_path: Path) -> None:
    runner = BundleRunner(load_bundle(threshold_segmenter(tmp_path / "b")), batch_size=3)
    assert runner.choice.active[-1] == "CPUExecutionProvider"
    hu = np.full((7, 40, 30), -1000.0, dtype=np.float32)
    hu[2:5, 10:20, 5:15] = 300.0
    probs = runner.predict_segmentation(hu, (1.0, 1.0))
    assert probs.shape == (1, 7, 40, 30)
    mask = probs[0] >= 0.5
    assert mask[3, 15, 10] and not mask[0].any() and not mask[3, 30, 25]


def test_classifier_gives_per_slice_probabilities(tmp_path: Path) -> None:
    runner = BundleRunner(load_bundle(max_classifier(tmp_path / "c")), batch_size=4)
    hu = np.full((5, 16, 16), -1000.0, dtype=np.float32)
    hu[3, 4, 4] = 300.0
    p = runner.predict_classification(hu, (1.0, 1.0))
    assert p.shape == (5, 1)
    assert p[3, 0] > 0.85 and p[0, 0] < 0.01


def test_preprocessing_resamples_pads_and_restores_geometry() -> None:
    spec = Preprocessing(window_min=-1000, window_max=1000, target_spacing_mm=1.0)
    hu = np.zeros((2, 50, 70), dtype=np.float32)
    hu[:, 20:30, 30:40] = 1000.0
    x, geometry = prepare_slices(hu, (1.5, 0.7), spec)
    assert geometry.resampled_shape == (75, 49)
    assert x.shape == (2, 80, 64)
    assert x.min() >= 0.0 and x.max() <= 1.0
    back = restore_slices(x, geometry)
    assert back.shape == hu.shape
    assert np.abs(back - (hu + 1000) / 2000).mean() < 0.02


def test_restore_skipping_empty_slices_gives_the_same_masks() -> None:
    rng = np.random.default_rng(0)
    low = (rng.random((6, 32, 32)) * 0.4).astype(np.float32)
    low[2, 10:14, 10:14] = 0.9
    spec = Preprocessing(window_min=-1000, window_max=1000, target_spacing_mm=None)
    _, geometry = prepare_slices(np.zeros((6, 50, 50), dtype=np.float32), (1.0, 1.0), spec)
    geometry = type(geometry)((70, 70), (32, 32), (32, 32))
    full = restore_slices(low, geometry)
    fast = restore_slices(low, geometry, skip_below=0.5)
    assert np.array_equal(full >= 0.5, fast >= 0.5)
    assert fast[0].max() == 0.0 and fast[2].max() > 0.5


def test_context_slices_feed_each_slice_with_its_neighbours(tmp_path: Path) -> None:
    # A 2.5D model whose output is (next slice - previous slice): checks order and edges.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dicomnode.inference.card import sha256_file

    w = numpy_helper.from_array(np.array([-1.0, 0.0, 1.0], np.float32).reshape(1, 3, 1, 1), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["out"])],
        "ctx",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bundle = threshold_segmenter(tmp_path / "b")
    onnx.save(model, bundle / "model.onnx")
    edit_card(
        bundle,
        sha256=sha256_file(bundle / "model.onnx"),
        input={"name": "image", "layout": "NCHW", "context_slices": 3},
        output={"name": "out", "activation": "none", "layout": "NCHW"},
        preprocessing={"window_min": 0, "window_max": 100, "target_spacing_mm": None},
    )
    card = json.loads((bundle / "card.json").read_text())
    card["labels"][0]["threshold"] = 0.01
    (bundle / "card.json").write_text(json.dumps(card))
    runner = BundleRunner(load_bundle(bundle), batch_size=2)
    hu = np.repeat(np.arange(5, dtype=np.float32)[:, None, None] * 10, 16, axis=1)
    hu = np.repeat(hu, 16, axis=2)  # slice k has value 10 k -> 0.1 k after the window
    out = runner.predict_segmentation(hu, (1.0, 1.0))[0, :, 8, 8]
    assert np.allclose(out, [0.1, 0.2, 0.2, 0.2, 0.1], atol=1e-5)


def test_classification_card_written_by_write_card_loads(tmp_path: Path) -> None:
    from dicomnode.inference.card import write_card

    bundle = max_classifier(tmp_path / "c")
    card = load_bundle(bundle).card
    write_card(bundle, card)
    assert load_bundle(bundle).card == card
