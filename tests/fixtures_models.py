"""Tiny ONNX models built with the onnx helper API for plumbing tests.

They are real models run by ONNX Runtime (a fixed 3x3 mean filter followed by a steep
sigmoid around a threshold), not stand-ins for one: what they segment is "bright voxels",
which is enough to test geometry and plumbing.  Quality tests use the shipped bundles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dicomnode.inference.card import CARD_SCHEMA, sha256_file

CODES = {
    "finding": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"},
    "segment_category": {
        "value": "49755003",
        "scheme": "SCT",
        "meaning": "Morphologically Altered Structure",
    },
    "segment_type": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"},
}


def _save(model: onnx.ModelProto, folder: Path, card: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    card["sha256"] = sha256_file(folder / "model.onnx")
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    return folder


def threshold_segmenter(folder: Path, level: float = 0.5) -> Path:
    """NCHW in, NCHW sigmoid out: p = sigmoid(40 * (mean3x3(x) - level))."""
    w = numpy_helper.from_array(np.full((1, 1, 3, 3), 40.0 / 9, dtype=np.float32), "w")
    b = numpy_helper.from_array(np.array([-40.0 * level], dtype=np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["z"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["z"], ["mask"]),
    ]
    graph = helper.make_graph(
        nodes,
        "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = {
        "schema": CARD_SCHEMA,
        "name": "test-threshold",
        "version": "0.0.1",
        "task": "segmentation",
        "model_file": "model.onnx",
        "opset": 17,
        "input": {"name": "image", "layout": "NCHW"},
        "preprocessing": {"window_min": -100.0, "window_max": 300.0, "target_spacing_mm": None},
        "output": {"name": "mask", "activation": "sigmoid", "layout": "NCHW"},
        "labels": [{"index": 0, "name": "Bright", "threshold": 0.5, **CODES}],
        "intended_use": "tests only",
        "disclaimer": "Not for diagnostic use.",
        "min_component_volume_mm3": 20.0,
    }
    return _save(model, folder, card)


def max_classifier(folder: Path) -> Path:
    """NCHW in, (N, 1) out: sigmoid(20 * (max(x) - 0.9))."""
    nodes = [
        helper.make_node("ReduceMax", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sub", ["m", "c"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p0"]),
        helper.make_node("Unsqueeze", ["p0", "ax"], ["prob"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.9, dtype=np.float32), "c"),
        numpy_helper.from_array(np.array(20.0, dtype=np.float32), "k"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax"),
    ]
    graph = helper.make_graph(
        nodes,
        "maxcls",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = {
        "schema": CARD_SCHEMA,
        "name": "test-maxcls",
        "version": "0.0.1",
        "task": "classification",
        "model_file": "model.onnx",
        "opset": 17,
        "input": {"name": "image", "layout": "NCHW"},
        "preprocessing": {"window_min": -100.0, "window_max": 300.0, "target_spacing_mm": None},
        "output": {"name": "prob", "activation": "sigmoid", "layout": "NC"},
        "labels": [
            {"index": 0, "name": "Bright present", "threshold": 0.5, "finding": CODES["finding"]}
        ],
        "intended_use": "tests only",
        "disclaimer": "Not for diagnostic use.",
    }
    return _save(model, folder, card)
