"""Tests of series -> Volume: geometry against phantom ground truth, errors, syntaxes."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.valuerep import DSfloat

from dicomnode.errors import ImagingError
from dicomnode.imaging.series import load_volume, volume_from_datasets
from dicomnode.imaging.volume import Volume
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom, write_phantom

BASE = {"rows": 96, "columns": 96, "slices": 40, "pixel_spacing": (3.5, 3.5), "slice_thickness": 4}


def _in_slice_order(phantom: Phantom, array: np.ndarray) -> np.ndarray:
    return array[::-1] if phantom.spec.reverse_order else array


def _assert_matches_ground_truth(volume: Volume, phantom: Phantom) -> None:
    spec = phantom.spec
    assert volume.shape == (spec.slices, spec.rows, spec.columns)
    np.testing.assert_array_equal(volume.pixels, _in_slice_order(phantom, phantom.hu))
    assert volume.pixel_spacing == pytest.approx(spec.pixel_spacing)
    assert volume.slice_spacing == pytest.approx(spec.slice_thickness)
    # slices run along the normal, whatever the file order
    normal = np.cross(volume.row_direction, volume.column_direction)
    np.testing.assert_allclose(volume.slice_direction, normal, atol=1e-9)
    for lesion, lesion_mask in zip(phantom.lesions, phantom.lesion_masks, strict=True):
        indices = np.argwhere(_in_slice_order(phantom, lesion_mask))
        # every lesion voxel centre maps inside the sphere (half a voxel of slack) ...
        points = volume.voxel_to_patient(indices)
        distances = np.linalg.norm(points - np.asarray(lesion.center_mm), axis=1)
        half_voxel = 0.5 * np.linalg.norm([*spec.pixel_spacing, spec.slice_thickness])
        assert distances.max() <= lesion.radius_mm + 1e-6
        # ... and the mask's centroid maps to the lesion centre within half a voxel
        centroid = volume.voxel_to_patient(indices.mean(axis=0))
        assert np.linalg.norm(centroid - np.asarray(lesion.center_mm)) <= half_voxel


@pytest.mark.parametrize(
    "variant",
    [
        {"orientation": "axial"},
        {"orientation": "axial", "reverse_order": True},
        {"orientation": "axial", "pixel_spacing": (3.5, 2.5), "columns": 128},
        {"orientation": "coronal"},
        {"orientation": "sagittal", "reverse_order": True},
        {"orientation": "oblique"},
        {"orientation": "oblique", "reverse_order": True, "pixel_spacing": (3.0, 3.5)},
    ],
    ids=str,
)
def test_volume_matches_phantom_geometry(tmp_path: Path, variant: dict[str, object]) -> None:
    # Given a phantom written to files, listed in a shuffled order
    phantom = generate_phantom(PhantomSpec(**{**BASE, **variant}))  # type: ignore[arg-type]
    paths = write_phantom(phantom, tmp_path)
    random.Random(0).shuffle(paths)

    # When the files are loaded
    volume = load_volume(paths)

    # Then pixels, spacing, slice order and lesion positions match the ground truth
    _assert_matches_ground_truth(volume, phantom)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in phantom.datasets}
    for k, uid in enumerate(volume.sop_instance_uids):
        position = [float(v) for v in by_uid[uid].ImagePositionPatient]
        np.testing.assert_allclose(volume.slice_position(k), position, atol=1e-6)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in volume.source_paths] == list(
        volume.sop_instance_uids
    )
    assert volume.modality == "CT"
    assert volume.study_instance_uid == phantom.datasets[0].StudyInstanceUID


def test_volume_from_datasets_in_memory() -> None:
    # Given reversed phantom datasets in memory
    phantom = generate_phantom(PhantomSpec(**BASE, reverse_order=True))  # type: ignore[arg-type]

    # When built without files
    volume = volume_from_datasets(phantom.datasets)

    # Then the volume is the same as from files, without source paths
    _assert_matches_ground_truth(volume, phantom)
    assert volume.source_paths == ()


def test_rescale_slope_and_intercept_are_applied() -> None:
    # Given slices with a non-trivial rescale
    phantom = generate_phantom(PhantomSpec(rows=32, columns=32, slices=3, n_lesions=0))
    for ds in phantom.datasets:
        ds.RescaleSlope = DSfloat(2, auto_format=True)
        ds.RescaleIntercept = DSfloat(-2048, auto_format=True)

    # When built
    volume = volume_from_datasets(phantom.datasets)

    # Then each voxel is slope * stored + intercept
    np.testing.assert_array_equal(volume.pixels, (phantom.hu + 1024) * 2 - 2048)


def test_single_slice_uses_slice_thickness_and_normal() -> None:
    # Given one coronal slice
    phantom = generate_phantom(
        PhantomSpec(rows=32, columns=32, slices=1, n_lesions=0, orientation="coronal")
    )

    # When built
    volume = volume_from_datasets(phantom.datasets)

    # Then spacing is SliceThickness and the direction is the normal
    assert volume.shape == (1, 32, 32)
    assert volume.slice_spacing == 2.5
    assert volume.slice_direction == (0.0, 1.0, 0.0)


TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
]


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda s: pydicom.uid.UID(s).name)
def test_lossless_transfer_syntaxes_round_trip_exactly(tmp_path: Path, syntax: str) -> None:
    # Given a phantom written in the transfer syntax
    spec = PhantomSpec(rows=64, columns=64, slices=3, n_lesions=0, transfer_syntax=syntax)
    phantom = generate_phantom(spec)
    paths = write_phantom(phantom, tmp_path)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax

    # When loaded, Then the HU are exactly the phantom's
    np.testing.assert_array_equal(load_volume(paths).pixels, phantom.hu)


@pytest.mark.peer
def test_jpeg_lossless_sv1_from_dcmcjpeg_round_trips(tmp_path: Path) -> None:
    # Given a phantom converted to JPEG Lossless SV1 by dcmtk (pydicom cannot encode it)
    exe = shutil.which("dcmcjpeg")
    if exe is None:
        pytest.skip("dcmcjpeg (dcmtk) is not installed")
    phantom = generate_phantom(PhantomSpec(rows=64, columns=64, slices=3, n_lesions=0))
    paths = []
    for source in write_phantom(phantom, tmp_path / "native"):
        target = tmp_path / source.name
        subprocess.run([exe, "+e1", str(source), str(target)], check=True, timeout=60)
        paths.append(target)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == JPEGLosslessSV1

    # When loaded, Then the HU are exact
    np.testing.assert_array_equal(load_volume(paths).pixels, phantom.hu)


def _datasets() -> list[Dataset]:
    spec = PhantomSpec(rows=32, columns=32, slices=6, n_lesions=0, noise_hu=0.0)
    return generate_phantom(spec).datasets


def _set_rows(ds: list[Dataset]) -> None:
    ds[2].Rows = 16
    ds[2].PixelData = ds[2].PixelData[: 16 * 32 * 2]


def _tilt(ds: list[Dataset]) -> None:
    ds[3].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def _spacing(ds: list[Dataset]) -> None:
    ds[1].PixelSpacing = [DSfloat(1.5, auto_format=True), DSfloat(1.4, auto_format=True)]


def _duplicate(ds: list[Dataset]) -> None:
    ds[4].ImagePositionPatient = ds[3].ImagePositionPatient


def _gap(ds: list[Dataset]) -> None:
    del ds[2]


def _irregular(ds: list[Dataset]) -> None:
    ds[3].ImagePositionPatient = [
        *ds[3].ImagePositionPatient[:2],
        ds[3].ImagePositionPatient[2] + 0.5,
    ]


def _no_position(ds: list[Dataset]) -> None:
    del ds[1].ImagePositionPatient


def _no_orientation(ds: list[Dataset]) -> None:
    del ds[0].ImageOrientationPatient


def _multiframe(ds: list[Dataset]) -> None:
    ds[0].NumberOfFrames = 2


def _single_without_thickness(ds: list[Dataset]) -> None:
    del ds[1:]
    del ds[0].SliceThickness


def _other_series(ds: list[Dataset]) -> None:
    ds[5].SeriesInstanceUID = "1.2.3.4"


def _empty(ds: list[Dataset]) -> None:
    ds.clear()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_set_rows, "mixed Rows/Columns"),
        (_tilt, "mixed ImageOrientationPatient"),
        (_spacing, "mixed PixelSpacing"),
        (_duplicate, "duplicate slice position"),
        (_gap, r"missing slice: 5\.00 mm between .* \(1 slice missing\)"),
        (_irregular, "irregular slice spacing"),
        (_no_position, "missing geometry attribute.*ImagePositionPatient"),
        (_no_orientation, "missing geometry attribute.*ImageOrientationPatient"),
        (_multiframe, "multi-frame image \\(NumberOfFrames 2\\) without a Per-Frame"),
        (_single_without_thickness, "single slice needs a positive SliceThickness"),
        (_other_series, "mixed series_instance_uid"),
        (_empty, "empty series"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_inconsistent_series_raise_imaging_error(corrupt: object, message: str) -> None:
    # Given a series broken in one way
    datasets = _datasets()
    assert callable(corrupt)
    corrupt(datasets)

    # When built, Then an ImagingError says what is wrong
    with pytest.raises(ImagingError, match=message):
        volume_from_datasets(datasets)


def test_error_names_the_offending_file(tmp_path: Path) -> None:
    # Given files where two slices share a position
    datasets = _datasets()
    _duplicate(datasets)
    paths = [tmp_path / f"slice{i}.dcm" for i in range(len(datasets))]
    for ds, path in zip(datasets, paths, strict=True):
        ds.save_as(path, enforce_file_format=True)

    # When loaded, Then the message names both files
    with pytest.raises(ImagingError, match=r"slice3\.dcm.*slice4\.dcm"):
        load_volume(paths)


def test_non_dicom_file_raises_imaging_error(tmp_path: Path) -> None:
    # Given a file that is not DICOM
    path = tmp_path / "notes.txt"
    path.write_text("not a dicom file")

    # When loaded, Then the error names it
    with pytest.raises(ImagingError, match=r"notes\.txt"):
        load_volume([path])


def test_signed_pixels_read_like_pydicom() -> None:
    # Given slices stored as signed 16-bit HU with intercept 0
    phantom = generate_phantom(PhantomSpec(rows=32, columns=32, slices=3, n_lesions=0))
    for ds, hu in zip(phantom.datasets, phantom.hu, strict=True):
        ds.PixelRepresentation = 1
        ds.BitsStored, ds.HighBit = 16, 15
        ds.RescaleIntercept = DSfloat(0, auto_format=True)
        ds.PixelData = hu.astype("<i2").tobytes()

    # When built, Then negative values survive and match pydicom's decoding
    volume = volume_from_datasets(phantom.datasets)
    np.testing.assert_array_equal(volume.pixels, phantom.hu)
    np.testing.assert_array_equal(volume.pixels[1], phantom.datasets[1].pixel_array)


def test_sheared_stack_keeps_its_slice_direction() -> None:
    # Given axial slices whose positions also step in y (gantry tilt kept in the positions)
    phantom = generate_phantom(PhantomSpec(rows=32, columns=32, slices=4, n_lesions=0))
    for k, ds in enumerate(phantom.datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [DSfloat(v, auto_format=True) for v in (x, y + 1.0 * k, z)]

    # When built
    volume = volume_from_datasets(phantom.datasets)

    # Then slice k lies where its file says, along a tilted slice direction
    for k, ds in enumerate(phantom.datasets):
        expected = [float(v) for v in ds.ImagePositionPatient]
        np.testing.assert_allclose(volume.slice_position(k), expected, atol=1e-6)
    assert volume.slice_direction[1] > 0.3
