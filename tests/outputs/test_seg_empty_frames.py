"""build_segmentation with omit_empty_frames: only frames with a segmented voxel, placed by
their references; an all-empty segment keeps its frames."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dicomnode.errors import OutputError
from dicomnode.outputs.seg import build_segmentation
from dicomnode.pipelines.results import SegmentResult

from .cases import Case
from .test_seg import assert_dciodvfy_clean, write_and_read

CaseFactory = Callable[[str], Case]


@pytest.mark.parametrize("geometry", ["axial-reversed", "oblique-nonsquare"])
def test_only_frames_with_a_segmented_voxel_are_written(
    geometry: str, case_factory: CaseFactory, tmp_path: Path
) -> None:
    # Given a phantom whose lesions cover some of its slices
    case = case_factory(geometry)
    covered = case.mask.any(axis=(1, 2))
    assert 0 < covered.sum() < len(covered)

    # When the SEG is built leaving empty frames out, written and read back
    seg = build_segmentation(case.result, case.source, omit_empty_frames=True)
    path, read = write_and_read(seg, tmp_path)

    # Then it has one frame per covered slice, each on the slice its reference names
    assert read.NumberOfFrames == covered.sum()
    uids = [uid for uid, kept in zip(case.volume.sop_instance_uids, covered, strict=True) if kept]
    pixels = read.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), case.mask[covered])
    assert_dciodvfy_clean(path)


def test_an_all_empty_segment_keeps_all_its_frames(case_factory: CaseFactory) -> None:
    # Given a result whose mask is empty
    case = case_factory("axial")
    empty = SegmentResult(1, case.result.segments[0].label, np.zeros_like(case.mask))
    result = replace(case.result, segments=(empty,), findings=())

    # When built leaving empty frames out, then every frame is still there
    seg = build_segmentation(result, case.source, omit_empty_frames=True)
    assert seg.NumberOfFrames == case.volume.shape[0]


def test_omit_empty_frames_must_be_a_bool(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    with pytest.raises(OutputError, match="omit_empty_frames must be a bool"):
        build_segmentation(case.result, case.source, omit_empty_frames="yes")  # type: ignore[arg-type]
