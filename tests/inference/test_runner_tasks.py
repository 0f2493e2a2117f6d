"""The shipped bundles through the runner: one entry point per task, GPU -> CPU fallback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from dicomnode.config import builtin_bundle
from dicomnode.errors import ModelError
from dicomnode.inference.card import Bundle, load_bundle
from dicomnode.inference.runner import BundleRunner, InferenceSession, ProviderChoice
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom

CPU = ("CPUExecutionProvider",)
GPU = ("CUDAExecutionProvider", "CPUExecutionProvider")
SPACING = (0.9, 1.1)


@pytest.fixture(scope="module")
def bundles() -> dict[str, Bundle]:
    return {name: load_bundle(builtin_bundle(name)) for name in ("lesion-seg", "lesion-cls")}


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """Ten axial slices, one lesion on slices 1-7."""
    spec = PhantomSpec(
        rows=160, columns=160, slices=10, seed=5, n_lesions=1, lesion_radius_mm=(8.0, 9.0)
    )
    return generate_phantom(spec)


def hu_volume() -> npt.NDArray[np.float32]:
    """Five slices of air with a soft-tissue disc on slice 2 (for runs that only compare)."""
    hu = np.full((5, 70, 60), -1000.0, dtype=np.float32)
    r, c = np.ogrid[:70, :60]
    hu[2][(r - 35) ** 2 + (c - 30) ** 2 <= 8**2] = 40.0
    return hu


def predict(runner: BundleRunner, hu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    if runner.card.task == "segmentation":
        return runner.predict_segmentation(hu, SPACING)
    return runner.predict_classification(hu, SPACING)


class FailingSession:
    """Stands in for an ORT session: ``run`` raises the first ``failures`` times."""

    def __init__(
        self, inner: InferenceSession | None, providers: Sequence[str], failures: int
    ) -> None:
        self.inner, self.providers, self.failures, self.calls = inner, providers, failures, 0

    def run(self, output_names: list[str], input_feed: dict[str, Any]) -> list[Any]:
        self.calls += 1
        if self.calls <= self.failures or self.inner is None:
            raise RuntimeError("CUDA failure 2: out of memory")
        return self.inner.run(output_names, input_feed)

    def get_providers(self) -> list[str]:
        return list(self.providers)

    def get_inputs(self) -> list[Any]:
        return self.inner.get_inputs() if self.inner else []

    def get_outputs(self) -> list[Any]:
        return self.inner.get_outputs() if self.inner else []


def record_opens(
    runner: BundleRunner, monkeypatch: pytest.MonkeyPatch, session: Any = None
) -> list[tuple[str, ...]]:
    """Log the providers of every session the runner opens from now on."""
    opened: list[tuple[str, ...]] = []
    real_open = runner._open

    def open_(providers: Sequence[str]) -> Any:
        opened.append(tuple(providers))
        return session if session is not None else real_open(providers)

    monkeypatch.setattr(runner, "_open", open_)
    return opened


def test_segmentation_gives_channels_slices_rows_columns(
    bundles: dict[str, Bundle], phantom: Phantom
) -> None:
    runner = BundleRunner(bundles["lesion-seg"], ("cpu",), batch_size=4)
    probs = runner.predict_segmentation(phantom.hu, phantom.spec.pixel_spacing)
    assert probs.shape == (1, *phantom.hu.shape) and probs.dtype == np.float32
    mask = probs[0] >= 0.5
    assert 2 * (mask & phantom.mask).sum() / (mask.sum() + phantom.mask.sum()) > 0.9


def test_classification_gives_slices_channels(bundles: dict[str, Bundle], phantom: Phantom) -> None:
    runner = BundleRunner(bundles["lesion-cls"], ("cpu",), batch_size=4)
    probs = runner.predict_classification(phantom.hu, phantom.spec.pixel_spacing)
    assert probs.shape == (phantom.hu.shape[0], 1) and probs.dtype == np.float32
    assert np.array_equal(probs[:, 0] >= 0.5, phantom.mask.any(axis=(1, 2)))


def test_the_other_task_s_entry_point_is_refused(bundles: dict[str, Bundle]) -> None:
    seg = BundleRunner(bundles["lesion-seg"], ("cpu",))
    cls = BundleRunner(bundles["lesion-cls"], ("cpu",))
    with pytest.raises(ModelError, match="lesion-seg is a segmentation model"):
        seg.predict_classification(hu_volume(), SPACING)
    with pytest.raises(ModelError, match="lesion-cls is a classification model"):
        cls.predict_segmentation(hu_volume(), SPACING)


@pytest.mark.parametrize("name", ["lesion-seg", "lesion-cls"])
def test_a_gpu_failure_falls_back_to_the_cpu_once(
    name: str,
    bundles: dict[str, Bundle],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a runner whose GPU session fails on its first batch (3 batches of 2 slices)
    # (on the whole field of view: a GPU does not crop to the body, test_body_crop.py)
    runner = BundleRunner(bundles[name], ("cpu",), batch_size=2, crop_to_body=False)
    expected = predict(runner, hu_volume())
    gpu = FailingSession(runner.session, GPU, failures=1)
    runner.session, runner.choice = gpu, ProviderChoice(GPU, GPU)
    opened = record_opens(runner, monkeypatch)
    # When it predicts
    with caplog.at_level(logging.WARNING, logger="dicomnode.inference.runner"):
        got = predict(runner, hu_volume())
    # Then it opened one CPU session, ran every batch there, and says so once
    assert np.array_equal(got, expected)
    assert opened == [CPU] and gpu.calls == 1
    assert runner.choice == ProviderChoice(GPU, CPU)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "CUDAExecutionProvider failed" in warnings[0] and "on the CPU" in warnings[0]


def test_a_cpu_failure_is_a_model_error(
    bundles: dict[str, Bundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a runner on the CPU whose session fails
    runner = BundleRunner(bundles["lesion-seg"], ("cpu",), batch_size=2)
    cpu = FailingSession(runner.session, CPU, failures=10)
    runner.session = cpu
    opened = record_opens(runner, monkeypatch)
    # When it predicts, Then the failure is a ModelError, with no retry
    with pytest.raises(ModelError, match="inference with lesion-seg failed: CUDA failure"):
        runner.predict_segmentation(hu_volume(), SPACING)
    assert cpu.calls == 1 and opened == []


def test_a_failure_after_the_fallback_is_a_model_error(
    bundles: dict[str, Bundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a runner on a GPU whose session fails, and whose CPU session fails too
    runner = BundleRunner(bundles["lesion-cls"], ("cpu",), batch_size=2)
    gpu, cpu = FailingSession(None, GPU, failures=1), FailingSession(None, CPU, failures=1)
    runner.session, runner.choice = gpu, ProviderChoice(GPU, GPU)
    opened = record_opens(runner, monkeypatch, session=cpu)
    # When it predicts, Then it falls back once and the CPU failure is a ModelError
    with pytest.raises(ModelError, match="inference with lesion-cls failed"):
        runner.predict_classification(hu_volume(), SPACING)
    assert (gpu.calls, cpu.calls, opened) == (1, 1, [CPU])
    assert runner.choice.active == CPU
