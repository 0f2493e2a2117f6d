"""Tests of the synthetic CT phantom: ground truth, headers, transfer syntaxes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

from dicomnode.errors import ImagingError
from dicomnode.synthetic.phantom import (
    LUNG_HU,
    Lesion,
    PhantomSpec,
    generate_phantom,
    write_phantom,
)

SMALL = PhantomSpec(rows=128, columns=128, slices=24, pixel_spacing=(2.8, 2.8), slice_thickness=5)


def test_default_phantom_has_ground_truth_consistent_with_its_lesions() -> None:
    # Given the default spec (256 x 256 x 64, three random lesions)
    # When a phantom is generated
    phantom = generate_phantom()

    # Then arrays, datasets and lesions agree
    assert phantom.hu.shape == phantom.mask.shape == (64, 256, 256)
    assert phantom.hu.dtype == np.float32 and phantom.mask.dtype == np.bool_
    assert len(phantom.datasets) == 64 and len(phantom.lesions) == 3
    assert len(phantom.lesion_masks) == 3
    union = np.logical_or.reduce(phantom.lesion_masks)
    assert np.array_equal(union, phantom.mask)
    for lesion, lesion_mask in zip(phantom.lesions, phantom.lesion_masks, strict=True):
        voxel_volume = 1.4 * 1.4 * 2.5
        sphere = 4 / 3 * np.pi * lesion.radius_mm**3
        assert lesion_mask.sum() * voxel_volume == pytest.approx(sphere, rel=0.25)
        # the lesion HU (plus noise) is what the mask covers
        assert float(phantom.hu[lesion_mask].mean()) == pytest.approx(lesion.hu, abs=3.0)
    assert [int(ds.InstanceNumber) for ds in phantom.datasets] == list(range(1, 65))


def test_random_lesions_sit_inside_the_lungs() -> None:
    # Given a phantom without noise
    phantom = generate_phantom(PhantomSpec(noise_hu=0.0, seed=3, n_lesions=4))

    # Then each lesion is surrounded by lung: dilating its mask by one voxel in-plane
    # reaches only lesion or lung voxels
    for lesion_mask in phantom.lesion_masks:
        ring = np.zeros_like(lesion_mask)
        ring[:, 1:, :] |= lesion_mask[:, :-1, :]
        ring[:, :-1, :] |= lesion_mask[:, 1:, :]
        ring[:, :, 1:] |= lesion_mask[:, :, :-1]
        ring[:, :, :-1] |= lesion_mask[:, :, 1:]
        ring &= ~phantom.mask
        assert ring.any()
        assert np.all(phantom.hu[ring] == LUNG_HU)


def test_same_seed_gives_same_pixels_and_new_uids() -> None:
    # Given two phantoms from one spec
    a, b = generate_phantom(SMALL), generate_phantom(SMALL)

    # Then pixels and lesions repeat, instance UIDs do not
    assert np.array_equal(a.hu, b.hu)
    assert a.lesions == b.lesions
    assert a.datasets[0].SOPInstanceUID != b.datasets[0].SOPInstanceUID


def test_explicit_lesions_and_uids_are_used() -> None:
    # Given a spec with one lesion at the volume centre and a fixed study UID
    lesion = Lesion(center_mm=(0.0, 0.0, 0.0), radius_mm=10.0, hu=300.0)
    spec = PhantomSpec(
        rows=64, columns=64, slices=16, lesions=(lesion,), noise_hu=0.0, study_instance_uid="1.2.3"
    )

    # When generated
    phantom = generate_phantom(spec)

    # Then the lesion is drawn where asked, with its HU
    assert phantom.lesions == (lesion,)
    assert np.all(phantom.hu[phantom.mask] == 300.0)
    centre = np.argwhere(phantom.mask).mean(axis=0)
    np.testing.assert_allclose(centre, [7.5, 31.5, 31.5], atol=0.5)
    assert {ds.StudyInstanceUID for ds in phantom.datasets} == {"1.2.3"}


def test_headers_describe_a_ct_series() -> None:
    # Given a phantom
    ds = generate_phantom(SMALL).datasets[5]

    # Then the instance carries the CT headers a PACS and a viewer expect
    assert ds.SOPClassUID == CTImageStorage
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.Modality == "CT" and ds.Manufacturer == "dicomnode phantom"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
    assert ds.BodyPartExamined == "CHEST" and ds.InstanceNumber == 6
    assert [float(v) for v in ds.PixelSpacing] == [2.8, 2.8]
    assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
    np.testing.assert_array_equal(
        ds.pixel_array.astype(np.float32) - 1024, generate_phantom(SMALL).hu[5]
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PhantomSpec(orientation="diagonal"), "orientation"),
        (PhantomSpec(transfer_syntax=JPEGLosslessSV1), "dcmcjpeg"),
        (PhantomSpec(transfer_syntax="1.2.3.4"), "not supported"),
        (PhantomSpec(pixel_spacing=(0.0, 1.0)), "positive"),
        (PhantomSpec(rows=32, columns=32, slices=2, n_lesions=3), "could not place"),
    ],
)
def test_invalid_spec_is_rejected_with_a_clear_message(spec: PhantomSpec, message: str) -> None:
    # When an impossible spec is generated, Then an ImagingError names the problem
    with pytest.raises(ImagingError, match=message):
        generate_phantom(spec)


def test_write_phantom_writes_part10_files(tmp_path: Path) -> None:
    # Given a JPEG-LS phantom
    phantom = generate_phantom(
        PhantomSpec(rows=64, columns=64, slices=4, n_lesions=0, transfer_syntax=JPEGLSLossless)
    )

    # When written
    paths = write_phantom(phantom, tmp_path / "series")

    # Then one readable file per instance, with file meta and lossless pixels
    assert [p.name for p in paths] == [f"IM_{i:05d}.dcm" for i in range(1, 5)]
    for path, hu in zip(paths, phantom.hu, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        np.testing.assert_array_equal(ds.pixel_array.astype(np.float32) - 1024, hu)


def _dciodvfy_or_skip() -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (dicom3tools) is required in CI")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    return exe


@pytest.mark.peer
@pytest.mark.parametrize("orientation", ["axial", "coronal", "oblique"])
def test_dciodvfy_reports_no_errors(tmp_path: Path, orientation: str) -> None:
    # Given a written phantom instance
    exe = _dciodvfy_or_skip()
    phantom = generate_phantom(
        PhantomSpec(rows=64, columns=64, slices=3, n_lesions=0, orientation=orientation)
    )
    path = write_phantom(phantom, tmp_path)[1]

    # When dciodvfy checks it
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)

    # Then it finds the CT Image IOD and no errors
    report = result.stdout + result.stderr
    assert "CTImage" in report
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report


def test_instances_share_no_elements() -> None:
    # Given a phantom
    phantom = generate_phantom(SMALL)

    # When one instance's header is edited
    phantom.datasets[2].Rows = 16
    phantom.datasets[2].ImageType[0] = "DERIVED"

    # Then the other instances keep theirs
    assert phantom.datasets[1].Rows == 128
    assert phantom.datasets[1].ImageType[0] == "ORIGINAL"
