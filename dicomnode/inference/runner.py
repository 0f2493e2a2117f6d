"""ONNX Runtime execution of a model bundle, slice-wise in batches.

Providers are plugins in a fixed order, TensorRT (only when asked) > CUDA > CPU; the first
available one is chosen once per session and logged.  onnxruntime-gpu lists CUDA as
available even on machines without a GPU and then silently falls back, so the providers the
session really got (``session.get_providers()``) are what we report.  A failure while
running on a GPU switches the runner to the CPU once, with one warning, and the batch is run
again there; a failure on the CPU is a :class:`~dicomnode.errors.ModelError`.

Segmentation and classification bundles have separate entry points with fixed output
shapes: :meth:`BundleRunner.predict_segmentation` and
:meth:`BundleRunner.predict_classification` for a whole volume, and
:meth:`BundleRunner.segment_slab` and :meth:`BundleRunner.classify_slab` for a volume
streamed in slabs (:mod:`dicomnode.inference.slabs`), which is how the pipelines run.

Sessions are opened with :func:`session_options` (threads, graph optimisation, memory
planning; measured in docs/performance.md).  On the CPU a batch holds at most
:data:`CPU_BATCH_SIZE` slices whatever the configured batch size (the one for GPUs): small
batches were faster there and keep the session's memory arena small, and a segmentation
model runs on the body's bounding box only (``crop_to_body``): air around the patient
cannot hold a lesion, and on a chest CT it is a third of the field of view.  The box's
edges stay on the network's stride grid, and the probabilities outside it are 0.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from dicomnode.errors import ModelError
from dicomnode.inference.card import Bundle
from dicomnode.inference.preprocess import (
    SliceGeometry,
    body_box,
    prepare_slices,
    restore_slices,
    stack_context,
)
from dicomnode.inference.slabs import Slab

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
CPU_ONLY = (PROVIDERS["cpu"],)

Task = Literal["segmentation", "classification"]

#: Slices per batch on the CPU, at most.  The shipped U-Net ran 300 slices of 256 x 256 in
#: 3.3-3.6 s at batch 4 and 3.9 s at 16 on two cores, and its memory arena holds 75 MB at 4
#: and 276 MB at 16 (docs/performance.md).  Outputs do not depend on the batch size.
CPU_BATCH_SIZE = 4

#: Pixels of the model's grid kept around the body when a segmentation model runs on
#: the body's box only (``crop_to_body``).  Inside the body the probabilities then differ
#: from the whole field of view's by at most 2.4e-4 (4e-3 with no margin; three phantoms,
#: docs/performance.md), and the masks were the same.
BODY_MARGIN = 8


class InferenceSession(Protocol):
    """The part of ``onnxruntime.InferenceSession`` the runner uses."""

    def run(self, output_names: list[str], input_feed: dict[str, Any]) -> list[Any]: ...

    def get_providers(self) -> list[str]: ...

    def get_inputs(self) -> list[Any]: ...

    def get_outputs(self) -> list[Any]: ...


@dataclass(frozen=True)
class ProviderChoice:
    requested: tuple[str, ...]
    active: tuple[str, ...]

    @property
    def on_gpu(self) -> bool:
        return self.active[0] != PROVIDERS["cpu"]


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


@functools.cache
def cuda_driver_present() -> bool:
    """Is an NVIDIA driver loadable?  onnxruntime-gpu lists CUDA even where there is none."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


#: Threads a process's model sessions may use, when it is given a share of a machine
#: (a Ray actor sets it to its ``num_cpus``); otherwise every CPU it may run on.
THREADS_ENV = "DICOMNODE_THREADS"


def cpu_count() -> int:
    """CPUs this process may run on (a container's limit, not the host's cores), or fewer
    when ``DICOMNODE_THREADS`` says so."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        available = os.cpu_count() or 1
    share = os.environ.get(THREADS_ENV, "")
    if share.isdigit() and int(share) > 0:
        return min(available, int(share))
    return available


def session_options(intra_op_threads: int = 0) -> Any:
    """``onnxruntime.SessionOptions`` for a bundle's session.

    - intra-op threads: ``intra_op_threads``, or every CPU this process may use (ONNX
      Runtime's own default counts the host's physical cores, which a container may not
      have); inter-op threads: 1, the graphs being one chain of operators;
    - all graph optimisations (the default, said explicitly);
    - no memory pattern planning: its block planned per input shape raised the peak by
      170 MB at batch 16 and made no difference to the time;
    - idle threads do not spin: the worker's Python (decoding, encoding) runs on the same
      cores, and spinning threads took their time.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = intra_op_threads or cpu_count()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def choose_providers(wanted: Sequence[str], tensorrt: bool = False) -> list[str]:
    """Map config names to ORT provider names, keeping only usable ones, CPU last."""
    names = [n for n in wanted if n != "tensorrt" or tensorrt]
    if tensorrt and "tensorrt" not in names:
        names.insert(0, "tensorrt")
    available = set(available_providers())
    if not cuda_driver_present():
        available -= {PROVIDERS["cuda"], PROVIDERS["tensorrt"]}
    chosen = [PROVIDERS[n] for n in names if PROVIDERS[n] in available]
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return chosen


class BundleRunner:
    """One ONNX Runtime session for one bundle."""

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] = ("cuda", "cpu"),
        *,
        tensorrt: bool = False,
        batch_size: int = 16,
        intra_op_threads: int = 0,
        crop_to_body: bool = True,
    ) -> None:
        self.bundle = bundle
        #: Segmentation on the CPU runs on the body's box only (see :meth:`_body_box`).
        self.crop_to_body = crop_to_body
        self.card = bundle.card
        #: The configured batch size (used on a GPU; see :attr:`batch_size`).
        self.configured_batch_size = batch_size
        self._options = session_options(intra_op_threads)
        requested = choose_providers(providers, tensorrt)
        self.session = self._open(requested)
        self.choice = ProviderChoice(tuple(requested), tuple(self.session.get_providers()))
        log.info(
            "model %s %s runs on %s (requested %s)",
            self.card.name,
            self.card.version,
            self.choice.active[0],
            ", ".join(requested),
        )
        names = [i.name for i in self.session.get_inputs()]
        if self.card.input.name not in names:
            raise ModelError(
                f"bundle {self.card.name}: model has no input {self.card.input.name!r}"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        if self.card.output.name not in outputs:
            raise ModelError(
                f"bundle {self.card.name}: model has no output {self.card.output.name!r}"
            )

    @property
    def batch_size(self) -> int:
        """Slices per batch: the configured size, at most :data:`CPU_BATCH_SIZE` on the CPU."""
        if self.choice.on_gpu:
            return self.configured_batch_size
        return min(self.configured_batch_size, CPU_BATCH_SIZE)

    # --- sessions -------------------------------------------------------------------------

    def _create_session(self, providers: Sequence[str]) -> InferenceSession:
        import onnxruntime as ort

        session: InferenceSession = ort.InferenceSession(
            str(self.bundle.model_path), sess_options=self._options, providers=list(providers)
        )
        return session

    def _open(self, providers: Sequence[str]) -> InferenceSession:
        """A session on ``providers``; one that cannot open on a GPU opens on the CPU."""
        if tuple(providers) != CPU_ONLY:
            try:
                return self._create_session(providers)
            except Exception as exc:
                log.warning(
                    "cannot open %s on %s (%s); using the CPU",
                    self.card.name,
                    ", ".join(providers),
                    exc,
                )
        try:
            return self._create_session(CPU_ONLY)
        except Exception as exc:
            raise ModelError(f"cannot load model {self.card.name}: {exc}") from exc

    def _fall_back_to_cpu(self, reason: Exception) -> None:
        """Replace the GPU session by a CPU one after a failed run; called at most once."""
        log.warning(
            "inference with %s on %s failed (%s); running on the CPU from now on",
            self.card.name,
            self.choice.active[0],
            reason,
        )
        self.session = self._open(CPU_ONLY)
        self.choice = ProviderChoice(self.choice.requested, CPU_ONLY)

    def _run_batch(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run (N, C, h, w) input (C = the card's context slices) in the card's layout.

        A failure on a GPU falls back to the CPU and the batch runs again there; a failure
        on the CPU raises :class:`ModelError`.
        """
        x = batch if self.card.input.layout == "NCHW" else np.moveaxis(batch, 1, -1)
        feed = {self.card.input.name: np.ascontiguousarray(x, dtype=np.float32)}
        while True:
            try:
                out = self.session.run([self.card.output.name], feed)[0]
            except Exception as exc:
                if not self.choice.on_gpu:
                    raise ModelError(f"inference with {self.card.name} failed: {exc}") from exc
                self._fall_back_to_cpu(exc)  # the CPU is not on_gpu: the loop runs twice at most
                continue
            return np.asarray(out, dtype=np.float32)

    # --- prediction -----------------------------------------------------------------------

    def _require_task(self, task: Task) -> None:
        if self.card.task != task:
            raise ModelError(
                f"bundle {self.card.name} is a {self.card.task} model, not a {task} model"
            )

    def _activate(self, y: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float32]:
        act = self.card.output.activation
        if act == "sigmoid" or act == "none":
            return y  # sigmoid models output probabilities already; "none" is passed through
        e = np.exp(y - y.max(axis=axis, keepdims=True))
        out: npt.NDArray[np.float32] = (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
        return out

    def _run_slices(
        self, x: npt.NDArray[np.float32], first: int = 0, last: int | None = None
    ) -> Iterator[npt.NDArray[np.float32]]:
        """Raw model output for slices ``first:last`` of prepared (slices, h, w) input, one
        batch at a time; the slices of ``x`` around them are their context."""
        last = x.shape[0] if last is None else last
        context = self.card.input.context_slices
        for start in range(first, last, self.batch_size):
            stop = min(start + self.batch_size, last)
            lo, hi = max(0, start - context // 2), min(x.shape[0], stop + context // 2)
            stacked = stack_context(x[lo:hi], context)  # neighbours across batch edges
            yield self._run_batch(stacked[start - lo : start - lo + stop - start])

    def _segment(
        self, x: npt.NDArray[np.float32], geometry: SliceGeometry, first: int, last: int
    ) -> npt.NDArray[np.float32]:
        """Probabilities (channels, slices, rows, columns) of slices ``first:last`` of ``x``
        on the source grid (values below the lowest label threshold may come back as 0)."""
        self._require_task("segmentation")
        box = self._body_box(x)
        if box is None:
            out = self._probabilities(x, first, last)
        else:
            rows, cols = box
            if rows.stop > rows.start and cols.stop > cols.start:
                inside = self._probabilities(x[:, rows, cols], first, last)
                count = inside.shape[1]
            else:  # nothing but air: nothing to run
                inside, count = None, 1 + max(label.index for label in self.card.labels)
            out = np.zeros((last - first, count, *x.shape[1:]), dtype=np.float32)
            if inside is not None:
                out[:, :, rows, cols] = inside
        # Only what can reach a label's threshold needs resampling (see restore_slices).
        floor = min(label.threshold for label in self.card.labels)
        channels = [
            restore_slices(out[:, c], geometry, skip_below=floor) for c in range(out.shape[1])
        ]
        if len(channels) == 1:  # no copy: the restored slices below the floor stay untouched
            return channels[0][np.newaxis]
        return np.stack(channels, axis=0)

    def _probabilities(
        self, x: npt.NDArray[np.float32], first: int, last: int
    ) -> npt.NDArray[np.float32]:
        """The model's probabilities (slices, channels, h, w) of slices ``first:last``."""
        outputs = []
        for y in self._run_slices(x, first, last):
            if self.card.output.layout == "NHWC":
                y = np.moveaxis(y, -1, 1)
            outputs.append(self._activate(y, axis=1))
        out: npt.NDArray[np.float32] = np.concatenate(outputs, axis=0)
        return out

    def _body_box(self, x: npt.NDArray[np.float32]) -> tuple[slice, slice] | None:
        """Where to run a segmentation model on prepared slices ``x``: the body's box
        (:func:`~dicomnode.inference.preprocess.body_box`), on the CPU when
        ``crop_to_body``; None for the whole field of view."""
        if not self.crop_to_body or self.choice.on_gpu:
            return None
        spec = self.card.preprocessing
        return body_box(x, spec, margin=BODY_MARGIN, multiple=spec.pad_multiple)

    def _classify(
        self, x: npt.NDArray[np.float32], first: int, last: int
    ) -> npt.NDArray[np.float32]:
        """Probabilities (slices, channels) of slices ``first:last`` of ``x``."""
        self._require_task("classification")
        outputs = [
            self._activate(y.reshape(y.shape[0], -1), axis=1)
            for y in self._run_slices(x, first, last)
        ]
        return np.concatenate(outputs, axis=0)

    def predict_segmentation(
        self,
        hu: npt.NDArray[np.float32],
        pixel_spacing: tuple[float, float],
        prepared: tuple[npt.NDArray[np.float32], SliceGeometry] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Probabilities (channels, slices, rows, columns) for a (slices, rows, columns) volume.

        On the source grid; values below the lowest label threshold may come back as 0.
        ``prepared`` is :func:`prepare_slices` output computed with this card's
        preprocessing (bundles with the same preprocessing share it).  Holds the whole
        volume's probabilities: the pipelines stream slabs through :meth:`segment_slab`.

        Raises
        ------
        ModelError
            The bundle is not a segmentation model, or inference failed on the CPU.
        """
        self._require_task("segmentation")
        x, geometry = prepared or prepare_slices(hu, pixel_spacing, self.card.preprocessing)
        return self._segment(x, geometry, 0, x.shape[0])

    def predict_classification(
        self,
        hu: npt.NDArray[np.float32],
        pixel_spacing: tuple[float, float],
        prepared: tuple[npt.NDArray[np.float32], SliceGeometry] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Probabilities (slices, channels) for a (slices, rows, columns) volume.

        ``prepared`` is as for :meth:`predict_segmentation`.

        Raises
        ------
        ModelError
            The bundle is not a classification model, or inference failed on the CPU.
        """
        self._require_task("classification")
        x, _ = prepared or prepare_slices(hu, pixel_spacing, self.card.preprocessing)
        return self._classify(x, 0, x.shape[0])

    def segment_slab(self, slab: Slab) -> npt.NDArray[np.float32]:
        """Probabilities (channels, slices, rows, columns) of the slab's own slices on the
        source grid; the slab must be prepared with this card's preprocessing and a halo
        of at least ``context_slices // 2``.  As :meth:`predict_segmentation` otherwise."""
        first, last = slab.own
        return self._segment(slab.x, slab.geometry, first, last)

    def classify_slab(self, slab: Slab) -> npt.NDArray[np.float32]:
        """Probabilities (slices, channels) of the slab's own slices (see
        :meth:`segment_slab`)."""
        first, last = slab.own
        return self._classify(slab.x, first, last)
