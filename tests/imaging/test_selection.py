"""Series hygiene: which instances of a series make its volume (select_stack)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from dicomnode.errors import ImagingError
from dicomnode.imaging.series import StackChoice, load_stack, load_volume, select_stack
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom, write_phantom

AXIAL = PhantomSpec(rows=32, columns=32, slices=5, n_lesions=0, pixel_spacing=(8.0, 8.0))


def _uids(phantom: Phantom) -> dict[str, str]:
    first = phantom.datasets[0]
    return {
        "study_instance_uid": first.StudyInstanceUID,
        "series_instance_uid": first.SeriesInstanceUID,
        "frame_of_reference_uid": first.FrameOfReferenceUID,
    }


def _write(datasets: list[Dataset], folder: Path, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{prefix}{i + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _axial(tmp_path: Path) -> tuple[Phantom, list[Path]]:
    phantom = generate_phantom(AXIAL)
    return phantom, write_phantom(phantom, tmp_path / "axial")


def _non_image(sop_class: str, phantom: Phantom, **extra: object) -> Dataset:
    """A minimal instance of ``sop_class`` in the phantom's series."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    first = phantom.datasets[0]
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = first.SeriesInstanceUID
    ds.Modality = "SR"
    ds.InstanceNumber = 99
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def _assert_plain_numbers(message: str) -> None:
    assert "np." not in message and "float64" not in message and "DSfloat" not in message
    assert not re.search(r"(?<![\d.])-?\d+\.\d{7,}(?![\d.])", message), message  # no 1.0000001


def test_localizers_in_the_series_are_left_out(tmp_path: Path) -> None:
    # Given a 5-slice axial series and 2 localizer images (coronal, other size) in it
    phantom, axial = _axial(tmp_path)
    scout = generate_phantom(
        PhantomSpec(
            rows=40, columns=48, slices=2, n_lesions=0, orientation="coronal", **_uids(phantom)
        )
    )
    for ds in scout.datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizers = _write(scout.datasets, tmp_path / "scout", "LOC")
    paths = [localizers[0], *axial[:2], localizers[1], *axial[2:]]

    # When the stack is selected
    choice = select_stack(paths)

    # Then the 5 axial slices are processed and the note says what was left out
    assert isinstance(choice, StackChoice)
    assert set(choice.paths) == set(axial)
    assert choice.left_out == (("localizer", 2),)
    assert choice.note == (
        "2 of 7 instances left out: 2 localizer (ImageType LOCALIZER); "
        "the 5-image axial stack was processed"
    )
    # And the volume is the axial stack, the same whether built from the series or the choice
    volume = load_volume(paths)
    assert volume.shape == (5, 32, 32)
    np.testing.assert_array_equal(volume.pixels, phantom.hu)
    np.testing.assert_array_equal(load_volume(choice.paths).pixels, volume.pixels)
    assert load_stack(choice).sop_instance_uids == volume.sop_instance_uids


def test_images_in_another_orientation_are_left_out(tmp_path: Path) -> None:
    # Given the axial series with 2 unflagged sagittal images of the same size in it
    phantom, axial = _axial(tmp_path)
    other = generate_phantom(
        PhantomSpec(
            rows=32,
            columns=32,
            slices=2,
            n_lesions=0,
            pixel_spacing=(8.0, 8.0),
            orientation="sagittal",
            **_uids(phantom),
        )
    )
    sagittal = _write(other.datasets, tmp_path / "sagittal", "SAG")

    # When selected
    choice = select_stack([*sagittal, *axial])

    # Then the larger, axial stack wins and the others are named by their orientation
    assert list(choice.paths) == axial
    assert choice.left_out == (("in another orientation", 2),)
    assert "2 in another orientation (sagittal)" in choice.note
    assert choice.note.endswith("the 5-image axial stack was processed")


@pytest.mark.parametrize(
    ("sop_class", "name", "extra"),
    [
        (ComprehensiveSRStorage, "Comprehensive SR Storage", {}),
        (KeyObjectSelectionDocumentStorage, "Key Object Selection Document Storage", {}),
        (GrayscaleSoftcopyPresentationStateStorage, "Grayscale Softcopy Presentation State", {}),
        (RTStructureSetStorage, "RT Structure Set Storage", {}),
        (EncapsulatedPDFStorage, "Encapsulated PDF Storage", {}),
        (SegmentationStorage, "Segmentation Storage", {"Rows": 32, "Columns": 32}),
    ],
    ids=lambda v: v if isinstance(v, str) and not v[0].isdigit() else "",
)
def test_non_images_sharing_the_series_uid_are_left_out(
    tmp_path: Path, sop_class: str, name: str, extra: dict[str, object]
) -> None:
    # Given the axial series and a non-image instance with the same Series Instance UID
    phantom, axial = _axial(tmp_path)
    (other,) = _write([_non_image(sop_class, phantom, **extra)], tmp_path / "other", "X")

    # When selected and loaded
    choice = select_stack([*axial[:3], other, *axial[3:]])
    volume = load_volume([*axial[:3], other, *axial[3:]])

    # Then the non-image is left out (never "missing geometry attribute(s) Rows, ...")
    assert set(choice.paths) == set(axial)
    assert choice.left_out == (("not an image", 1),)
    assert f"1 of 6 instances left out: 1 not an image ({name}" in choice.note
    np.testing.assert_array_equal(volume.pixels, phantom.hu)


def test_a_series_of_non_images_only_names_why_nothing_is_processed(tmp_path: Path) -> None:
    phantom, _ = _axial(tmp_path)
    paths = _write([_non_image(ComprehensiveSRStorage, phantom)], tmp_path / "sr", "SR")

    with pytest.raises(ImagingError) as error:
        select_stack(paths)

    message = str(error.value)
    assert "no instance of the series can be a slice of a volume" in message
    assert "1 not an image (Comprehensive SR Storage), e.g. " in message
    assert str(paths[0]) in message


def test_a_clean_series_has_no_note_and_selecting_again_changes_nothing(tmp_path: Path) -> None:
    _, axial = _axial(tmp_path)

    choice = select_stack(list(reversed(axial)))

    assert (choice.note, choice.left_out) == ("", ())
    assert list(choice.paths) == axial  # slice order: along the normal
    assert choice.frames == ((),) * 5
    assert select_stack(choice.paths) == choice


def test_a_missing_slice_fails_naming_the_gap_and_the_files_on_each_side(tmp_path: Path) -> None:
    # Given an axial series (slices 2.5 mm apart) whose third slice never arrived
    phantom, axial = _axial(tmp_path)
    del axial[2]

    # When selected or loaded, Then the error names the gap in mm and both neighbours
    for attempt in (select_stack, load_volume):
        with pytest.raises(ImagingError) as error:
            attempt(axial)
        message = str(error.value)
        assert message.startswith("missing slice: 5.00 mm between ")
        assert f"{axial[1]} at (" in message and f"{axial[2]} at (" in message
        z = [float(phantom.datasets[i].ImagePositionPatient[2]) for i in (1, 3)]
        assert f"{z[0]:.2f}) mm" in message and f"{z[1]:.2f}) mm" in message
        assert "other slices are 2.50 mm apart (1 slice missing)" in message
        _assert_plain_numbers(message)


def _two_phases(tmp_path: Path, second_slices: int = 5) -> tuple[Phantom, Phantom, list[Path]]:
    """Phase 1 (5 slices) and phase 2 at the same positions, in one series."""
    first = generate_phantom(AXIAL)
    second = generate_phantom(
        PhantomSpec(
            rows=32,
            columns=32,
            slices=second_slices,
            n_lesions=0,
            pixel_spacing=(8.0, 8.0),
            seed=1,
            **_uids(first),
        )
    )
    for phase, phantom in ((1, first), (2, second)):
        for k, ds in enumerate(phantom.datasets):
            ds.TemporalPositionIdentifier = phase
            ds.InstanceNumber = 10 * phase + k
            ds.AcquisitionTime = f"0930{10 * phase + k:02d}"  # differs per slice: no phase
    paths = write_phantom(first, tmp_path / "phase1") + write_phantom(second, tmp_path / "phase2")
    return first, second, paths


def test_two_phases_of_equal_size_process_the_first(tmp_path: Path) -> None:
    # Given two phases at the same 5 positions (TemporalPositionIdentifier 1 and 2)
    first, _, paths = _two_phases(tmp_path)

    # When selected and loaded
    choice = select_stack(paths[::-1])
    volume = load_volume(paths[::-1])

    # Then the phase with the lowest InstanceNumber is processed, and the note says so
    assert choice.left_out == (("in another phase", 5),)
    assert choice.note == (
        "5 of 10 instances left out: 5 in another phase (TemporalPositionIdentifier 2); "
        "the 5-image axial stack (TemporalPositionIdentifier 1) was processed"
    )
    np.testing.assert_array_equal(volume.pixels, first.hu)


def test_the_larger_phase_wins(tmp_path: Path) -> None:
    # Given a second phase covering 7 positions, 5 of them shared with the first phase
    _, second, paths = _two_phases(tmp_path, second_slices=7)

    choice = select_stack(paths)

    assert choice.left_out == (("in another phase", 5),)
    assert choice.note.endswith(
        "the 7-image axial stack (TemporalPositionIdentifier 2) was processed"
    )
    np.testing.assert_array_equal(load_volume(paths).pixels, second.hu)


def test_a_repeated_slice_of_another_acquisition_is_left_out(tmp_path: Path) -> None:
    # Given a clean series plus one slice scanned again (AcquisitionNumber 2)
    phantom, axial = _axial(tmp_path)
    again = phantom.datasets[2].copy()
    again.SOPInstanceUID = generate_uid()
    again.file_meta = phantom.datasets[2].file_meta.copy()
    again.file_meta.MediaStorageSOPInstanceUID = again.SOPInstanceUID
    again.AcquisitionNumber = 2
    (extra,) = _write([again], tmp_path / "again", "AGAIN")

    choice = select_stack([*axial, extra])

    assert set(choice.paths) == set(axial)
    assert choice.left_out == (("in another phase", 1),)
    assert "1 in another phase (AcquisitionNumber 2)" in choice.note


def test_frames_at_one_position_that_nothing_tells_apart_fail_naming_them(tmp_path: Path) -> None:
    # Given two different instances at the same position with the same attributes
    phantom, axial = _axial(tmp_path)
    twin = phantom.datasets[3].copy()
    twin.SOPInstanceUID = generate_uid()
    twin.file_meta = phantom.datasets[3].file_meta.copy()
    twin.file_meta.MediaStorageSOPInstanceUID = twin.SOPInstanceUID
    (extra,) = _write([twin], tmp_path / "twin", "TWIN")

    with pytest.raises(ImagingError) as error:
        select_stack([*axial, extra])

    message = str(error.value)
    assert "6 frames with up to 2 at one slice position" in message
    assert str(axial[3]) in message and str(extra) in message
    assert "AcquisitionNumber 1 and 1" in message
    assert "no attribute among TemporalPositionIdentifier" in message
    _assert_plain_numbers(message)


def test_messages_print_numbers_as_numbers(tmp_path: Path) -> None:
    # Given slices whose orientation or spacing differ from the first's
    _, axial = _axial(tmp_path)
    tilted = pydicom.dcmread(axial[3])
    tilted.ImageOrientationPatient = [DSfloat(v, auto_format=True) for v in (1, 0, 0, 0, 0.6, -0.8)]
    tilted.save_as(axial[3])
    bad = pydicom.dcmread(axial[1])
    del bad.PixelSpacing
    bad.add_new(0x00280030, "LO", "8\\x")  # what a broken writer sends for a DS
    bad.save_as(axial[1])

    # When loaded, Then the messages print plain numbers
    from dicomnode.imaging.series import volume_from_datasets

    datasets = [pydicom.dcmread(p) for p in axial]
    with pytest.raises(ImagingError) as error:
        volume_from_datasets([datasets[0], datasets[3]], [axial[0], axial[3]])
    assert f"1, 0, 0, 0, 1, 0 in {axial[0]}" in str(error.value)
    assert f"1, 0, 0, 0, 0.6, -0.8 in {axial[3]}" in str(error.value)
    _assert_plain_numbers(str(error.value))
    with pytest.raises(ImagingError) as error:
        select_stack(axial)
    assert f"{axial[1]}: PixelSpacing is not numeric: 8, x" in str(error.value)


def test_instances_of_two_series_are_refused_naming_both(tmp_path: Path) -> None:
    _, axial = _axial(tmp_path)
    other = write_phantom(generate_phantom(AXIAL), tmp_path / "other")

    with pytest.raises(ImagingError, match="instances of two series were given as one"):
        select_stack([*axial, *other])


def test_loading_reads_each_file_once_and_keeps_headers_without_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a series whose stack was chosen (each header read once, its pixels left in the file)
    phantom = generate_phantom(AXIAL)
    files = write_phantom(phantom, tmp_path)
    choice = select_stack(files)
    parsed: list[object] = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parsed.append(a) or real(*a, **k))
    # When the volume is loaded
    volume = load_stack(choice)
    # Then no file was parsed again, the pixels are those of the files, and the headers kept
    # for the SEG and SR hold no pixel data
    assert parsed == []
    assert np.array_equal(volume.pixels, phantom.hu)
    assert all("PixelData" not in h for h in choice.headers)
    assert all("Rows" in h for h in choice.headers)
    # and the same choice loaded again reads its files again, to the same volume
    assert np.array_equal(load_stack(choice).pixels, phantom.hu)
    assert len(parsed) == len(files)


def test_a_series_is_prefetched_before_its_headers_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The node writes spool files past the page cache: a job asks the kernel to read the
    # series ahead (WILLNEED, whole files) before it parses them one by one.
    from dicomnode.imaging import selection

    paths = write_phantom(
        generate_phantom(PhantomSpec(rows=64, columns=64, slices=6, n_lesions=0)), tmp_path
    )
    advised: list[tuple[int, int, int]] = []
    reads: list[int] = []
    real_read = selection.read_header
    monkeypatch.setattr(
        selection.os, "posix_fadvise", lambda fd, off, n, how: advised.append((off, n, how))
    )
    monkeypatch.setattr(
        selection,
        "read_header",
        lambda path, **kw: reads.append(len(advised)) or real_read(path, **kw),
    )
    select_stack(paths)
    assert advised == [(0, 0, selection.os.POSIX_FADV_WILLNEED)] * len(paths)
    assert reads and min(reads) == len(paths)  # all advised before the first header read
    # A file gone since is left to the read to report
    selection.prefetch([tmp_path / "gone.dcm", *paths[:1]])
    assert len(advised) == len(paths) + 1
