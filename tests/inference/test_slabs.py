"""Slabs: a volume streamed through preprocessing and the model gives the whole-volume result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dicomnode.config import builtin_bundle
from dicomnode.inference.card import Preprocessing, load_bundle, sha256_file
from dicomnode.inference.preprocess import prepare_slices
from dicomnode.inference.runner import BundleRunner
from dicomnode.inference.slabs import iter_slabs, slab_slices
from fixtures_models import threshold_segmenter

SPEC = Preprocessing(window_min=-1000.0, window_max=400.0, target_spacing_mm=1.4)


def context_segmenter(folder: Path) -> Path:
    """A 2.5D model (3 context slices): sigmoid(next slice + centre - previous slice)."""
    bundle = threshold_segmenter(folder)
    w = np.array([-1.0, 1.0, 1.0], np.float32).reshape(1, 3, 1, 1)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["out"]),
        ],
        "ctx",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, bundle / "model.onnx")
    card = json.loads((bundle / "card.json").read_text())
    card.update(
        sha256=sha256_file(bundle / "model.onnx"),
        input={"name": "image", "layout": "NCHW", "context_slices": 3},
        output={"name": "out", "activation": "sigmoid", "layout": "NCHW"},
        preprocessing={"window_min": -1000.0, "window_max": 400.0, "target_spacing_mm": 1.3},
    )
    (bundle / "card.json").write_text(json.dumps(card))
    return bundle


def noisy_volume(slices: int = 11, shape: tuple[int, int] = (40, 36)) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(-1100, 600, size=(slices, *shape)).astype(np.int16)


def test_slabs_cover_the_volume_once_with_their_halos() -> None:
    # Given 11 slices in slabs of 4 for a model that sees one neighbour on each side
    hu = noisy_volume()

    # When cut into slabs
    slabs = list(iter_slabs(hu, (0.9, 0.8), SPEC, slices=4, context=3))

    # Then the slabs' own slices follow one another, each with the neighbours it has
    assert [(s.start, s.stop, s.before) for s in slabs] == [(0, 4, 0), (4, 8, 1), (8, 11, 1)]
    whole, geometry = prepare_slices(hu, (0.9, 0.8), SPEC)
    for slab in slabs:
        lo = slab.start - slab.before
        assert slab.geometry == geometry
        np.testing.assert_array_equal(slab.x, whole[lo : lo + len(slab.x)])
        first, last = slab.own
        np.testing.assert_array_equal(slab.x[first:last], whole[slab.start : slab.stop])


def test_a_slab_is_a_whole_number_of_every_batch() -> None:
    assert slab_slices(4) == 16
    assert slab_slices(4, 6) == 24
    assert slab_slices(64) == 64
    assert slab_slices(3, target=2) == 3
    with pytest.raises(ValueError, match="positive"):
        next(iter_slabs(noisy_volume(), (1.0, 1.0), SPEC, slices=0))


@pytest.mark.parametrize("slices", [1, 2, 3, 5, 11, 40])
def test_streamed_segmentation_equals_the_whole_volume_with_context(
    tmp_path: Path, slices: int
) -> None:
    # Given a 2.5D model and a volume as int16
    runner = BundleRunner(load_bundle(context_segmenter(tmp_path / "ctx")), ("cpu",), batch_size=2)
    hu = noisy_volume()

    # When it runs slab by slab
    streamed = np.concatenate(
        [
            runner.segment_slab(slab)
            for slab in iter_slabs(
                hu, (0.9, 0.8), runner.card.preprocessing, slices=slices, context=3
            )
        ],
        axis=1,
    )

    # Then the probabilities are those of the whole volume in one go, bit for bit
    whole = runner.predict_segmentation(hu.astype(np.float32), (0.9, 0.8))
    assert streamed.shape == whole.shape == (1, *hu.shape)
    np.testing.assert_array_equal(streamed, whole)


def test_shipped_models_give_the_same_output_in_slabs_as_whole() -> None:
    # Given the shipped bundles and a CT-like volume
    seg = BundleRunner(load_bundle(builtin_bundle("lesion-seg")), ("cpu",))
    cls = BundleRunner(load_bundle(builtin_bundle("lesion-cls")), ("cpu",))
    hu = noisy_volume(9, (64, 64))

    # When streamed in slabs of 4
    slabs = list(iter_slabs(hu, (0.7, 0.7), seg.card.preprocessing, slices=4))
    probs = np.concatenate([seg.segment_slab(s) for s in slabs], axis=1)
    # (each model's own preprocessing: lesion-seg 1.1.x works at 1.0 mm, lesion-cls at 1.4)
    cls_slabs = iter_slabs(hu, (0.7, 0.7), cls.card.preprocessing, slices=4)
    per_slice = np.concatenate([cls.classify_slab(s) for s in cls_slabs])

    # Then both are the whole-volume outputs, bit for bit
    np.testing.assert_array_equal(probs, seg.predict_segmentation(hu, (0.7, 0.7)))
    np.testing.assert_array_equal(per_slice, cls.predict_classification(hu, (0.7, 0.7)))
