"""ONNX Runtime vs TensorFlow inference time on the same model and the same inputs.

Runs the exported bundle (ONNX Runtime, CPU provider) and its Keras checkpoint (a compiled
``tf.function``) over the same preprocessed slices of a synthetic CT, in the same batches,
several times (alternating), and reports min/median/max seconds and of the TF/ORT ratio of
adjacent runs (> 1: ONNX Runtime is faster).  Preprocessing is
timed separately (it is the same numpy code for both).

    python -m dicomnode.converters.benchmark BUNDLE_DIR RUN_DIR [--slices 300 --matrix 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def _interleaved(fns: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Time each function ``repeats`` times, alternating, after one warm-up call each.

    Alternating runs see the same background load (the machine may be shared), so the
    ratio of adjacent runs is fairer than a ratio of two separate series.
    """
    for fn in fns:
        fn()  # warm-up: graph tracing, session initialisation, memory arenas
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def benchmark(
    bundle_dir: Path,
    run_dir: Path,
    *,
    slices: int = 300,
    matrix: int = 512,
    spacing_mm: float = 0.7,
    batch: int = 8,
    repeats: int = 5,
    threads: int = 0,
) -> dict[str, Any]:
    """Time ORT and TF on ``slices`` slices of a ``matrix``^2 phantom CT."""
    import keras
    import onnxruntime as ort
    import tensorflow as tf

    from dicomnode.inference.card import load_bundle
    from dicomnode.inference.preprocess import prepare_slices
    from dicomnode.models.run import RunFiles
    from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom

    bundle = load_bundle(bundle_dir)
    card = bundle.card
    phantom = generate_phantom(
        PhantomSpec(
            rows=matrix,
            columns=matrix,
            slices=slices,
            pixel_spacing=(spacing_mm, spacing_mm),
            slice_thickness=1.0,
            seed=3,
        )
    )
    start = time.perf_counter()
    x, _ = prepare_slices(phantom.hu, phantom.spec.pixel_spacing, card.preprocessing)
    prep_s = time.perf_counter() - start
    nchw = x[:, None]
    nhwc = x[..., None]

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(bundle.model_path), options, providers=["CPUExecutionProvider"]
    )

    def run_ort() -> list[npt.NDArray[np.float32]]:
        return [
            session.run([card.output.name], {card.input.name: nchw[i : i + batch]})[0]
            for i in range(0, len(nchw), batch)
        ]

    model = keras.saving.load_model(
        RunFiles.locate(run_dir).checkpoint_path(run_dir), compile=False
    )
    channels = int(model.inputs[0].shape[-1])
    forward = tf.function(
        lambda t: model(t, training=False),
        input_signature=[tf.TensorSpec((None, None, None, channels), tf.float32)],
    )

    def run_tf() -> list[npt.NDArray[np.float32]]:
        return [
            forward(tf.constant(nhwc[i : i + batch])).numpy() for i in range(0, len(nhwc), batch)
        ]

    y_ort = np.concatenate(run_ort())
    y_tf = np.concatenate(run_tf())
    if card.output.layout == "NCHW":
        y_tf = np.transpose(y_tf, (0, 3, 1, 2))
    ort_s, tf_s = _interleaved([run_ort, run_tf], repeats)
    ratios = [t / o for t, o in zip(tf_s, ort_s, strict=True)]
    return {
        "bundle": card.name,
        "input": {
            "slices": slices,
            "matrix": matrix,
            "spacing_mm": spacing_mm,
            "model_input": list(nchw.shape),
            "batch": batch,
        },
        "cpu_count": os.cpu_count(),
        "preprocess_s": prep_s,
        "onnxruntime_s": _stats(ort_s),
        "tensorflow_s": _stats(tf_s),
        "tf_over_ort": _stats(ratios),
        "max_abs_diff": float(np.abs(y_ort - y_tf).max()),
        "versions": {"onnxruntime": ort.__version__, "tensorflow": tf.__version__},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dicomnode.converters.benchmark", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("run", type=Path, help="the training run (or .keras) it was exported from")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all)")
    args = parser.parse_args(argv)
    result = benchmark(
        args.bundle,
        args.run,
        slices=args.slices,
        matrix=args.matrix,
        batch=args.batch,
        repeats=args.repeats,
        threads=args.threads,
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
