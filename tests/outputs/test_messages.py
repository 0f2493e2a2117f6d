"""Output errors print plain numbers: no numpy reprs, no quoted decimal strings."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from dicomnode.errors import OutputError
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_measurement_report

from .cases import Case

CaseFactory = Callable[[str], Case]


def test_position_mismatch_prints_plain_numbers(case_factory: CaseFactory) -> None:
    # Given a source slice moved by 7.25 mm
    case = case_factory("axial")
    source = list(case.source)
    moved = copy.deepcopy(source[3])
    moved.ImagePositionPatient = [float(v) + 7.25 for v in moved.ImagePositionPatient]
    source[3] = moved
    expected = case.volume.slice_position(3)

    # When a SEG is built on it, the message gives both positions as numbers
    with pytest.raises(OutputError) as caught:
        build_segmentation(case.result, source)
    message = str(caught.value)
    assert "source_datasets[3].ImagePositionPatient [" in message
    assert f"at [{round(expected[0], 3)}, " in message
    assert "np." not in message and "'" not in message


def test_numpy_values_are_printed_as_numbers(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    seg = build_segmentation(case.result, case.source)
    finding = replace(case.result.findings[0], mean_hu=np.float64("nan"))
    with pytest.raises(OutputError, match=r"mean_hu must be a finite number, not nan$"):
        build_measurement_report(replace(case.result, findings=(finding,)), case.source, seg)
    with pytest.raises(OutputError, match=r"series_number must be a positive integer, not 0$"):
        build_measurement_report(case.result, case.source, seg, series_number=np.int64(0))  # type: ignore[arg-type]
