"""The phantom as one Enhanced CT Image instance: header, frames, validity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedCTImageStorage, RLELossless

from dicomnode.outputs.validate import run_dciodvfy
from dicomnode.synthetic.enhanced import enhanced_dataset
from dicomnode.synthetic.phantom import (
    RESCALE_INTERCEPT,
    PhantomSpec,
    generate_phantom,
    write_phantom_enhanced,
)

SPEC = PhantomSpec(rows=40, columns=48, slices=7, pixel_spacing=(6.0, 6.5), n_lesions=0)


def _text(values: object) -> list[str]:
    """DS values as written to the file."""
    assert isinstance(values, list | pydicom.multival.MultiValue)
    return [str(v) for v in values]


def _dciodvfy_clean(path: Path, require_tool: Callable[[str], str]) -> None:
    require_tool("dciodvfy")
    report = run_dciodvfy(path)
    assert report.errors == [] and report.warnings == [], report.output


@pytest.mark.parametrize("orientation", ["axial", "oblique", "sagittal"])
def test_enhanced_phantom_holds_the_classic_frames_in_dataset_order(
    tmp_path: Path, orientation: str, require_tool: Callable[[str], str]
) -> None:
    # Given a phantom whose slices run against the normal
    phantom = generate_phantom(
        PhantomSpec(**{**SPEC.__dict__, "orientation": orientation, "reverse_order": True})
    )

    # When written as one Enhanced CT instance
    path = write_phantom_enhanced(phantom, tmp_path)
    ds = pydicom.dcmread(path)

    # Then it has one frame per classic dataset, in the same order, same pixels and geometry
    assert path.name == "ENHANCED_CT.dcm"
    assert ds.SOPClassUID == EnhancedCTImageStorage
    assert int(ds.NumberOfFrames) == 7
    first = phantom.datasets[0]
    assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (
        first.StudyInstanceUID,
        first.FrameOfReferenceUID,
    )
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation_item = shared.PlaneOrientationSequence[0]
    assert _text(orientation_item.ImageOrientationPatient) == _text(first.ImageOrientationPatient)
    assert list(shared.PixelMeasuresSequence[0].PixelSpacing) == [6.0, 6.5]
    assert float(shared.PixelValueTransformationSequence[0].RescaleIntercept) == RESCALE_INTERCEPT
    positions = [
        _text(item.PlanePositionSequence[0].ImagePositionPatient)
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    assert positions == [_text(d.ImagePositionPatient) for d in phantom.datasets]
    in_stack = [
        int(item.FrameContentSequence[0].InStackPositionNumber)
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    assert in_stack == list(range(7, 0, -1))  # 1 at the start of the normal
    np.testing.assert_array_equal(ds.pixel_array, phantom.hu - RESCALE_INTERCEPT)
    _dciodvfy_clean(path, require_tool)


def test_later_phases_follow_as_temporal_positions(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    phantom = generate_phantom(SPEC)
    second = generate_phantom(
        PhantomSpec(
            **{
                **SPEC.__dict__,
                "seed": 9,
                "study_instance_uid": phantom.datasets[0].StudyInstanceUID,
                "frame_of_reference_uid": phantom.datasets[0].FrameOfReferenceUID,
            }
        )
    )

    ds = enhanced_dataset(phantom, later_phases=[second])
    path = tmp_path / "phases.dcm"
    ds.save_as(path, enforce_file_format=True)

    assert int(ds.NumberOfFrames) == 14
    temporal = [
        int(item.FrameContentSequence[0].TemporalPositionIndex)
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    assert temporal == [1] * 7 + [2] * 7
    np.testing.assert_array_equal(
        pydicom.dcmread(path).pixel_array,
        np.concatenate([phantom.hu, second.hu]) - RESCALE_INTERCEPT,
    )
    _dciodvfy_clean(path, require_tool)
    with pytest.raises(ValueError, match="geometry"):
        enhanced_dataset(phantom, later_phases=[generate_phantom(PhantomSpec(slices=7))])


def test_enhanced_phantom_in_a_compressed_syntax(tmp_path: Path) -> None:
    phantom = generate_phantom(PhantomSpec(**{**SPEC.__dict__, "transfer_syntax": RLELossless}))

    ds = pydicom.dcmread(write_phantom_enhanced(phantom, tmp_path))

    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(ds.pixel_array, phantom.hu - RESCALE_INTERCEPT)
