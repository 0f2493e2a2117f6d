"""TF-vs-ONNX Runtime parity check: the gate every exported model must pass.

The same held-out inputs go through the Keras model and through the ONNX graph on ONNX
Runtime's CPU provider; the largest absolute difference over all outputs must not exceed
the tolerance, or the exporter refuses to write the bundle.  The report is recorded in the
card's ``parity`` field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.errors import ModelError

DEFAULT_TOLERANCE = 1e-4


class ParityError(ModelError):
    """The ONNX graph does not reproduce the TensorFlow model within the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    inputs: int
    input_shapes: list[list[int]]
    provider: str
    onnxruntime: str

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def to_layout(nhwc: npt.NDArray[np.float32], layout: str) -> npt.NDArray[np.float32]:
    """Convert a channels-last array to the named layout (NCHW, NHWC or NC)."""
    if layout == "NCHW":
        return np.ascontiguousarray(np.transpose(nhwc, (0, 3, 1, 2)))
    return np.ascontiguousarray(nhwc)


def measure_parity(
    keras_model: Any,
    onnx_bytes: bytes,
    inputs: Sequence[npt.NDArray[np.float32]],
    *,
    input_name: str,
    input_layout: str,
    output_layout: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ParityReport:
    """Run both models on each (N, H, W, C) batch in ``inputs`` and compare the outputs.

    Outputs are compared in the ONNX output layout, element by element.
    """
    import onnxruntime as ort

    if not inputs:
        raise ValueError("parity check needs at least one input batch")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    max_diff = 0.0
    total = 0.0
    count = 0
    shapes: list[list[int]] = []
    for batch in inputs:
        x = np.asarray(batch, dtype=np.float32)
        shapes.append([int(s) for s in x.shape])
        expected = np.asarray(keras_model(x, training=False).numpy(), dtype=np.float32)
        if expected.ndim == 4:
            expected = to_layout(expected, output_layout)
        (actual,) = session.run(None, {input_name: to_layout(x, input_layout)})
        if actual.shape != expected.shape:
            raise ParityError(
                f"ONNX output shape {actual.shape} differs from TensorFlow's {expected.shape}"
            )
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        if not np.all(np.isfinite(diff)):
            raise ParityError("ONNX or TensorFlow output contains NaN or infinity")
        max_diff = max(max_diff, float(diff.max()))
        total += float(diff.sum())
        count += diff.size
    return ParityReport(
        max_abs_diff=max_diff,
        mean_abs_diff=total / max(count, 1),
        tolerance=float(tolerance),
        inputs=len(inputs),
        input_shapes=shapes,
        provider="CPUExecutionProvider",
        onnxruntime=ort.__version__,
    )


def check_parity(*args: Any, **kwargs: Any) -> ParityReport:
    """:func:`measure_parity`, raising :class:`ParityError` when the tolerance is exceeded."""
    report = measure_parity(*args, **kwargs)
    if not report.passed:
        raise ParityError(
            f"TF-vs-ONNX parity failed: max abs diff {report.max_abs_diff:.3g} exceeds "
            f"tolerance {report.tolerance:.3g}; bundle not written"
        )
    return report
