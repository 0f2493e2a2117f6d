"""Enhanced multi-frame images -> Volume, as classic single-frame series give it."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicomnode.errors import ImagingError
from dicomnode.imaging.series import (
    load_volume,
    select_stack,
    source_datasets,
    volume_from_datasets,
)
from dicomnode.imaging.volume import Volume
from dicomnode.synthetic.enhanced import enhanced_dataset
from dicomnode.synthetic.phantom import (
    Phantom,
    PhantomSpec,
    generate_phantom,
    write_phantom,
    write_phantom_enhanced,
)

BASE = {"rows": 48, "columns": 40, "slices": 12, "pixel_spacing": (7.0, 8.0), "slice_thickness": 5}


def _phantom(**variant: object) -> Phantom:
    return generate_phantom(PhantomSpec(**{**BASE, **variant}))  # type: ignore[arg-type]


def _assert_same_volume(enhanced: Volume, classic: Volume) -> None:
    np.testing.assert_array_equal(enhanced.pixels, classic.pixels)
    for name in (
        "origin",
        "row_direction",
        "column_direction",
        "slice_direction",
        "pixel_spacing",
        "slice_spacing",
        "study_instance_uid",
        "frame_of_reference_uid",
        "modality",
    ):
        assert getattr(enhanced, name) == getattr(classic, name), name


@pytest.mark.parametrize(
    "variant",
    [
        {"orientation": "axial"},
        {"orientation": "axial", "reverse_order": True},
        {"orientation": "oblique"},
        {"orientation": "oblique", "reverse_order": True},
        {"orientation": "coronal", "reverse_order": True},
    ],
    ids=str,
)
def test_enhanced_ct_gives_the_classic_volume_voxel_for_voxel(
    tmp_path: Path, variant: dict[str, object]
) -> None:
    # Given a phantom written as a classic series (shuffled) and as one Enhanced CT instance
    phantom = _phantom(**variant)
    classic_paths = write_phantom(phantom, tmp_path / "classic")
    random.Random(0).shuffle(classic_paths)
    path = write_phantom_enhanced(phantom, tmp_path / "enhanced")

    # When both are loaded
    classic = load_volume(classic_paths)
    enhanced = load_volume([path])

    # Then pixels and geometry are the same, and each slice names its source frame
    _assert_same_volume(enhanced, classic)
    n = phantom.spec.slices
    frames = tuple(range(n, 0, -1)) if phantom.spec.reverse_order else tuple(range(1, n + 1))
    assert enhanced.source_frames == frames
    assert enhanced.is_multiframe and not classic.is_multiframe
    assert classic.source_frames == (0,) * n
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert enhanced.sop_instance_uids == (uid,) * n
    assert enhanced.source_paths == (path,) * n
    # frame f of the instance is the phantom's dataset f - 1 (frames in dataset order)
    for k, frame in enumerate(enhanced.source_frames):
        np.testing.assert_array_equal(enhanced.pixels[k], phantom.hu[frame - 1])


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["RLE", "J2K"])
def test_compressed_enhanced_ct_decodes_frame_by_frame(tmp_path: Path, syntax: str) -> None:
    phantom = _phantom(slices=5, n_lesions=0, transfer_syntax=syntax, reverse_order=True)
    path = write_phantom_enhanced(phantom, tmp_path)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax

    volume = load_volume([path])

    np.testing.assert_array_equal(volume.pixels, phantom.hu[::-1])


def test_volume_from_an_enhanced_dataset_in_memory() -> None:
    phantom = _phantom(orientation="oblique", reverse_order=True, n_lesions=1)
    ds = enhanced_dataset(phantom)

    volume = volume_from_datasets([ds])

    np.testing.assert_array_equal(volume.pixels, phantom.hu[::-1])
    assert volume.source_paths == ()
    assert volume.source_frames == tuple(range(12, 0, -1))


def test_select_stack_names_the_frames_and_source_datasets_reads_the_instance_once(
    tmp_path: Path,
) -> None:
    phantom = _phantom(reverse_order=True, n_lesions=0)
    path = write_phantom_enhanced(phantom, tmp_path)

    choice = select_stack([path])
    volume = load_volume([path])

    assert (choice.paths, choice.note, choice.left_out) == ((path,), "", ())
    assert choice.frames == (tuple(range(12, 0, -1)),)
    (header,) = source_datasets(volume)
    assert header.SOPInstanceUID == volume.sop_instance_uids[0]
    assert "PixelData" not in header


def test_two_phases_in_one_enhanced_instance_process_the_first(tmp_path: Path) -> None:
    # Given one Enhanced CT instance holding two phases (Temporal Position Index 1 and 2)
    first = _phantom(n_lesions=0)
    second = _phantom(
        n_lesions=0,
        seed=1,
        study_instance_uid=first.datasets[0].StudyInstanceUID,
        frame_of_reference_uid=first.datasets[0].FrameOfReferenceUID,
    )
    path = tmp_path / "phases.dcm"
    enhanced_dataset(first, later_phases=[second]).save_as(path, enforce_file_format=True)

    # When selected and loaded
    choice = select_stack([path])
    volume = load_volume([path])

    # Then frames 1-12 (phase 1) make the volume and the note tells about phase 2
    assert choice.frames == (tuple(range(1, 13)),)
    assert choice.left_out == (("in another phase", 12),)
    assert choice.note == (
        "12 of 24 frames left out: 12 in another phase (TemporalPositionIndex 2); "
        "the 12-frame axial stack (TemporalPositionIndex 1) was processed"
    )
    np.testing.assert_array_equal(volume.pixels, first.hu)
    assert volume.source_frames == tuple(range(1, 13))


def test_enhanced_frames_without_a_position_fail_naming_the_frame(tmp_path: Path) -> None:
    phantom = _phantom(n_lesions=0, slices=3)
    ds = enhanced_dataset(phantom)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)

    with pytest.raises(ImagingError, match=r"broken\.dcm frame 2: missing geometry attribute "):
        load_volume([path])


# pydicom's test files (pydicom-data, downloaded on first use; skipped when offline)


def _testdata(name: str) -> Path:
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"{name} is not available (pydicom-data download failed)")
    return Path(str(found))


def test_pydicom_enhanced_ct_loads_as_a_volume() -> None:
    # Given pydicom's Enhanced CT (2 frames, 512 x 512, frame 1 at z = -159, frame 2 at -149)
    path = _testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)

    # When loaded
    volume = load_volume([path])

    # Then the frames are ordered along the normal (0, 0, -1): frame 2 first
    assert volume.shape == (2, 512, 512)
    assert volume.source_frames == (2, 1)
    assert volume.slice_direction == (0.0, 0.0, -1.0)
    assert volume.slice_spacing == pytest.approx(10.0)
    assert volume.pixel_spacing == pytest.approx((0.388672, 0.388672))
    assert volume.slice_position(0) == pytest.approx((99.5, -301.5, -149.0))
    expected = ds.pixel_array[[1, 0]].astype(np.float32) - 1024  # RescaleIntercept -1024
    np.testing.assert_array_equal(volume.pixels, expected)


@pytest.mark.parametrize(
    "name",
    [
        "emri_small.dcm",
        "emri_small_RLE.dcm",
        "emri_small_big_endian.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ],
)
def test_pydicom_enhanced_mr_without_functional_groups_fails_saying_why(name: str) -> None:
    # Given pydicom's small Enhanced MR files: 10 frames, their functional groups removed
    path = _testdata(name)

    # When loaded, Then the error says there is no geometry per frame
    with pytest.raises(ImagingError) as error:
        load_volume([path])
    assert str(error.value) == (
        "no instance of the series can be a slice of a volume: 1 without patient geometry "
        f"(10 frames without a Per-Frame Functional Groups Sequence), e.g. {path}"
    )
