"""ONNX Runtime sessions are opened with our options; the CPU runs small batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.inference.card import load_bundle
from dicomnode.inference.runner import (
    CPU_BATCH_SIZE,
    THREADS_ENV,
    BundleRunner,
    cpu_count,
    session_options,
)
from fixtures_models import threshold_segmenter


def test_session_options_name_threads_optimisation_and_memory_planning() -> None:
    import onnxruntime as ort

    options = session_options()
    assert options.intra_op_num_threads == cpu_count() >= 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_mem_pattern is False
    assert options.enable_cpu_mem_arena is True
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(3).intra_op_num_threads == 3


def test_a_process_given_a_share_of_the_machine_uses_that_many_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ray actor with ``num_cpus = 1`` on a node of several cores sets DICOMNODE_THREADS
    (``app.raybackend.share_threads``): its sessions must not take every core."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from dicomnode.app.raybackend import share_threads
    from dicomnode.config import Config, RaySettings

    monkeypatch.delenv(THREADS_ENV, raising=False)
    everything = cpu_count()
    share_threads(Config(ray=RaySettings(num_cpus=1)))
    assert cpu_count() == 1 and session_options().intra_op_num_threads == 1
    monkeypatch.setenv(THREADS_ENV, "1000")  # never more than the process may use
    assert cpu_count() == everything
    monkeypatch.setenv(THREADS_ENV, "many")  # not a number: ignored
    assert cpu_count() == everything


def test_the_runner_s_session_is_opened_with_them(tmp_path: Path) -> None:
    # Given a runner asked for one intra-op thread
    runner = BundleRunner(
        load_bundle(threshold_segmenter(tmp_path / "b")), ("cpu",), intra_op_threads=1
    )

    # Then its session was opened with the options
    opened = runner.session.get_session_options()  # type: ignore[attr-defined]
    assert opened.intra_op_num_threads == 1
    assert opened.inter_op_num_threads == 1
    assert opened.enable_mem_pattern is False
    assert opened.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize(("configured", "expected"), [(16, CPU_BATCH_SIZE), (2, 2)])
def test_on_the_cpu_a_batch_holds_at_most_cpu_batch_size_slices(
    tmp_path: Path, configured: int, expected: int
) -> None:
    # Given a runner on the CPU with a configured batch size
    runner = BundleRunner(
        load_bundle(threshold_segmenter(tmp_path / "b")), ("cpu",), batch_size=configured
    )
    batches: list[int] = []
    inner = runner.session

    class Recording:
        def run(self, names: list[str], feed: dict[str, Any]) -> list[Any]:
            batches.extend(len(v) for v in feed.values())
            return inner.run(names, feed)

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    runner.session = Recording()  # type: ignore[assignment]

    # When it segments 10 slices
    runner.predict_segmentation(np.zeros((10, 8, 8), dtype=np.float32), (1.0, 1.0))

    # Then the batches are of the smaller size
    assert runner.batch_size == expected
    assert batches == [expected] * (10 // expected) + ([10 % expected] if 10 % expected else [])
