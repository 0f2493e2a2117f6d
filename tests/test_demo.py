"""`dicomnode demo`: the README's first command, end to end on loopback."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from dicomnode.app.demo import run_demo


@pytest.mark.slow
def test_demo_returns_results_that_match_the_ground_truth(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_demo(tmp_path, out, slices=32, size=256, seed=3)
    text = out.getvalue()
    dice = float(re.search(r"Dice of the SEG against the ground truth: ([0-9.]+)", text)[1])
    assert dice > 0.9
    assert "MISSED" not in text
    assert "classification: lesion" in text
    assert "triage priority: urgent" in text  # lesions of 10 mm and more
    assert "QIDO-RS GET" in text and "SEG " in text
    assert "[COMPLETED]" in text or "[IN PROGRESS]" in text  # the SR's answer may be in flight
    assert (tmp_path / "preview.png").stat().st_size > 1000
    # the heat map and the key image of each finding (issue 12)
    assert re.search(r"heat map \(Parametric Map .*\): segmentation probability of lesion", text)
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    keys = re.findall(r"^  lesion \d+: image \d+ \(slice \d+ of 32\)", text, re.M)
    assert len(keys) == 3
    assert len(list((tmp_path / "pacs").glob("*.dcm"))) == 4  # SEG, heat map, KOS, SR
