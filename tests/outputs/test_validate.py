"""The validator wrappers must see the errors the tools report (else tests pass vacuously)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.errors import OutputError
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.validate import find_tool, run_dciodvfy, run_dsrdump

from .cases import Case, require_tool


@pytest.fixture
def broken_seg(case_factory: Callable[[str], Case], tmp_path: Path) -> Path:
    case = case_factory("axial")
    path = tmp_path / "broken.dcm"
    build_segmentation(case.result, case.source).save_as(path, enforce_file_format=True)
    ds = dcmread(path)
    del ds.SegmentSequence[0].SegmentLabel  # Type 1
    ds.save_as(path)
    return path


def test_dciodvfy_reports_a_missing_type_1_attribute(broken_seg: Path) -> None:
    require_tool("dciodvfy")
    report = run_dciodvfy(broken_seg)
    assert not report.ok
    assert any("SegmentLabel" in line for line in report.errors), report.output


def test_dsrdump_reports_a_document_that_is_not_sr(broken_seg: Path) -> None:
    require_tool("dsrdump")
    report = run_dsrdump(broken_seg)
    assert not report.ok
    assert report.returncode != 0


def test_missing_file_and_missing_tool() -> None:
    assert find_tool("no-such-validator-here") is None
    with pytest.raises(OutputError, match="path"):
        run_dciodvfy(Path("/nonexistent/file.dcm"))
