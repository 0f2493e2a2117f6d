"""Turn the instances of one single-frame series into a :class:`Volume`.

Slices are ordered by the projection of ImagePositionPatient on the slice normal (the
cross product of the row and column directions of ImageOrientationPatient, PS3.3
C.7.6.2.1.1), never by InstanceNumber or z, so any orientation and either slice order
give the same volume.  The slice spacing comes from the positions, not from
SliceThickness.  A series that is not one regular stack (mixed sizes, orientations or
pixel spacings, duplicate positions, gaps) raises :class:`ImagingError` naming the
offending files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.errors import ImagingError
from dicomnode.imaging.volume import Volume

#: Largest difference tolerated between direction cosines of different slices.
ORIENTATION_TOLERANCE = 1e-4
#: Absolute tolerance (mm) on positions and spacings; the relative one is 1 %.
POSITION_TOLERANCE_MM = 0.01
SPACING_RELATIVE_TOLERANCE = 0.01

_NATIVE_LITTLE_ENDIAN = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
#: What pydicom and the conversions raise on values that make no sense for their attribute.
_UNREADABLE = (
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    IndexError,
    OverflowError,
    MemoryError,
)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_REQUIRED = ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")


@dataclass(frozen=True)
class _SliceHeader:
    """What the geometry checks need from one instance."""

    label: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    orientation: npt.NDArray[np.float64]  # six direction cosines
    position: npt.NDArray[np.float64]
    slice_thickness: float | None
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str


def _floats(ds: Dataset, keyword: str, count: int, label: str) -> list[float]:
    values = ds[keyword].value
    values = (
        list(values) if isinstance(values, Sequence) and not isinstance(values, str) else [values]
    )
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ImagingError(f"{label}: {keyword} is not numeric: {values!r}") from exc
    if len(floats) != count or not all(math.isfinite(v) for v in floats):
        raise ImagingError(f"{label}: {keyword} must have {count} finite values, got {values!r}")
    return floats


def _read_header(ds: Dataset, label: str) -> _SliceHeader:
    frames = ds.get("NumberOfFrames")
    if "PerFrameFunctionalGroupsSequence" in ds or (frames not in (None, "") and int(frames) > 1):
        raise ImagingError(
            f"{label}: multi-frame images (NumberOfFrames={frames}) are not supported yet"
        )
    missing = [k for k in _REQUIRED if ds.get(k) in (None, "", [])]
    if "PixelData" not in ds:
        missing.append("PixelData")
    if missing:
        raise ImagingError(f"{label}: missing geometry attribute(s) {', '.join(missing)}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImagingError(f"{label}: only single-sample (grey-scale) images are supported")
    row_spacing, column_spacing = _floats(ds, "PixelSpacing", 2, label)
    if row_spacing <= 0 or column_spacing <= 0:
        raise ImagingError(f"{label}: PixelSpacing must be positive, got {ds.PixelSpacing}")
    orientation = np.array(_floats(ds, "ImageOrientationPatient", 6, label))
    row, col = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(float(row @ col)) > 1e-3
    ):
        raise ImagingError(
            f"{label}: ImageOrientationPatient is not two orthogonal unit vectors: "
            f"{list(orientation)}"
        )
    thickness = ds.get("SliceThickness")
    return _SliceHeader(
        label=label,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing=(row_spacing, column_spacing),
        orientation=orientation,
        position=np.array(_floats(ds, "ImagePositionPatient", 3, label)),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        modality=str(ds.get("Modality", "")),
    )


def _check_consistent(headers: Sequence[_SliceHeader]) -> None:
    """All slices share size, orientation, pixel spacing, series and frame of reference."""
    first = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise ImagingError(
                f"mixed Rows/Columns in one series: {first.rows}x{first.columns} in "
                f"{first.label}, {h.rows}x{h.columns} in {h.label}"
            )
        if np.max(np.abs(h.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise ImagingError(
                f"mixed ImageOrientationPatient in one series: {list(first.orientation)} in "
                f"{first.label}, {list(h.orientation)} in {h.label}"
            )
        pairs = zip(h.pixel_spacing, first.pixel_spacing, strict=True)
        if any(abs(a - b) > max(1e-4, 1e-3 * b) for a, b in pairs):
            raise ImagingError(
                f"mixed PixelSpacing in one series: {list(first.pixel_spacing)} in "
                f"{first.label}, {list(h.pixel_spacing)} in {h.label}"
            )
        for name in ("series_instance_uid", "frame_of_reference_uid"):
            if getattr(h, name) != getattr(first, name):
                raise ImagingError(
                    f"mixed {name} in one series: {getattr(first, name)!r} in {first.label}, "
                    f"{getattr(h, name)!r} in {h.label}"
                )


@dataclass(frozen=True)
class _Stack:
    order: npt.NDArray[np.intp]  # read index of each slice, in slice order
    origin: npt.NDArray[np.float64]
    slice_direction: npt.NDArray[np.float64]
    slice_spacing: float


def _stack_geometry(headers: Sequence[_SliceHeader]) -> _Stack:
    """Sort along the normal and check that the positions form one regular stack."""
    first = headers[0]
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    normal /= np.linalg.norm(normal)
    if len(headers) == 1:
        thickness = first.slice_thickness
        if thickness is None or not (math.isfinite(thickness) and thickness > 0):
            raise ImagingError(
                f"{first.label}: a single slice needs a positive SliceThickness to give the "
                "volume a slice spacing"
            )
        return _Stack(np.zeros(1, dtype=np.intp), first.position, normal, thickness)
    positions = np.stack([h.position for h in headers])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    sorted_positions, sorted_distances = positions[order], distances[order]
    gaps = np.diff(sorted_distances)
    for i in np.flatnonzero(gaps <= POSITION_TOLERANCE_MM):
        a, b = headers[order[i]], headers[order[i + 1]]
        raise ImagingError(
            f"duplicate slice position {_mm(a.position)} mm along the normal in {a.label} and "
            f"{b.label}; split the series (e.g. by phase or acquisition) before loading"
        )
    steps = np.diff(sorted_positions, axis=0)
    mean_step = (sorted_positions[-1] - sorted_positions[0]) / (len(headers) - 1)
    spacing = float(np.linalg.norm(mean_step))
    if not math.isfinite(spacing):
        raise ImagingError(
            f"slice positions {_mm(sorted_positions[0])} to {_mm(sorted_positions[-1])} mm "
            "are too far apart to be one series"
        )
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * spacing)
    deviations = np.linalg.norm(steps - mean_step, axis=1)
    worst = int(np.argmax(deviations))
    if deviations[worst] > tolerance:
        a, b = headers[order[worst]], headers[order[worst + 1]]
        raise ImagingError(
            f"irregular slice spacing: step of {np.linalg.norm(steps[worst]):.3f} mm between "
            f"{a.label} and {b.label}, expected {spacing:.3f} mm (missing slice, gap or "
            "overlapping acquisitions?)"
        )
    return _Stack(order, sorted_positions[0], mean_step / spacing, spacing)


def _mm(v: npt.NDArray[np.float64]) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in v) + ")"


def _native_pixels(ds: Dataset) -> npt.NDArray[np.integer] | None:
    """Stored values of a native little-endian 16-bit slice without pydicom's decoder.

    pydicom's generic path costs ~2 ms per 512 x 512 slice; reading the buffer directly
    costs microseconds.  Returns None where the generic decoder is needed.
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = getattr(file_meta, "TransferSyntaxUID", None)
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (
        syntax not in _NATIVE_LITTLE_ENDIAN
        or int(ds.get("BitsAllocated", 0) or 0) != 16
        or (signed and bits_stored != 16)
        or not 1 <= bits_stored <= 16
    ):
        return None
    count = int(ds.Rows) * int(ds.Columns)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < 2 * count:
        return None
    stored = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=count)
    if not signed and bits_stored < 16:
        stored = stored & np.uint16((1 << bits_stored) - 1)  # bits above BitsStored are not pixel
    return stored.reshape(int(ds.Rows), int(ds.Columns))


def _rescale_into(ds: Dataset, label: str, out: npt.NDArray[np.float32]) -> None:
    """Decode one slice into ``out`` and apply the modality rescale (or Modality LUT)."""
    stored = _native_pixels(ds)
    if stored is None:
        try:
            stored = ds.pixel_array
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # decoders raise many types; name the file and syntax
            # pylibjpeg-rle (Rust, pyo3) panics on corrupt RLE with PanicException, which
            # derives from BaseException: uncaught, it would end the worker, not the job.
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            raise ImagingError(
                f"{label}: cannot decode pixel data (transfer syntax {syntax}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if stored.shape != out.shape:
        raise ImagingError(
            f"{label}: pixel array {stored.shape} does not match Rows/Columns {out.shape}"
        )
    if "ModalityLUTSequence" in ds:
        out[...] = apply_modality_lut(stored, ds)
        return
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    # Rescaled values must be finite in float32 for every stored value the dtype can hold.
    largest = abs(slope) * 2.0 ** (8 * stored.dtype.itemsize) + abs(intercept)
    if not (math.isfinite(largest) and largest < _FLOAT32_MAX):
        raise ImagingError(
            f"{label}: RescaleSlope {slope} / RescaleIntercept {intercept} overflow float32"
        )
    out[...] = stored
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)


def _permute_in_place(pixels: npt.NDArray[np.float32], order: npt.NDArray[np.intp]) -> None:
    """``pixels[:] = pixels[order]`` with one temporary slice instead of a full copy."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        saved = pixels[start].copy()
        j = start
        while True:
            done[j] = True
            source = int(order[j])
            if source == start:
                pixels[j] = saved
                break
            pixels[j] = pixels[source]
            j = source


def _label(index: int, ds: Dataset, paths: Sequence[Path]) -> str:
    if index < len(paths):
        return str(paths[index])
    return f"dataset {index} (SOPInstanceUID {ds.get('SOPInstanceUID', '?')})"


class _VolumeBuilder:
    """Collects slices one at a time into a preallocated array, then builds the Volume."""

    def __init__(self, count: int) -> None:
        if count == 0:
            raise ImagingError("cannot build a volume from an empty series")
        self.count = count
        self.headers: list[_SliceHeader] = []
        self.pixels: npt.NDArray[np.float32] | None = None

    def add(self, ds: Dataset, label: str) -> None:
        try:
            header = _read_header(ds, label)
            if self.pixels is None:
                shape = (self.count, header.rows, header.columns)
                self.pixels = np.empty(shape, dtype=np.float32)
            else:
                _check_consistent([self.headers[0], header])
            _rescale_into(ds, label, self.pixels[len(self.headers)])
        except ImagingError:
            raise
        except _UNREADABLE as exc:
            # A value that breaks its VR or makes no sense (a US with two values, a DS
            # "0x10", an IS "nan") reached through pydicom: the file is unusable, say which.
            raise ImagingError(
                f"{label}: unreadable attribute value ({type(exc).__name__}: {exc})"
            ) from exc
        self.headers.append(header)

    def build(self, paths: Sequence[Path]) -> Volume:
        assert self.pixels is not None and len(self.headers) == self.count
        stack = _stack_geometry(self.headers)
        _permute_in_place(self.pixels, stack.order)
        first = self.headers[0]
        ordered = [self.headers[i] for i in stack.order]
        return Volume(
            pixels=self.pixels,
            origin=_vec3(stack.origin),
            row_direction=_vec3(first.orientation[:3]),
            column_direction=_vec3(first.orientation[3:]),
            slice_direction=_vec3(stack.slice_direction),
            pixel_spacing=first.pixel_spacing,
            slice_spacing=stack.slice_spacing,
            study_instance_uid=first.study_instance_uid,
            series_instance_uid=first.series_instance_uid,
            frame_of_reference_uid=first.frame_of_reference_uid,
            modality=first.modality,
            sop_instance_uids=tuple(h.sop_instance_uid for h in ordered),
            source_paths=tuple(paths[i] for i in stack.order) if paths else (),
        )


def _vec3(v: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def volume_from_datasets(datasets: Sequence[Dataset], paths: Sequence[Path] = ()) -> Volume:
    """Build a :class:`Volume` from the datasets (with pixel data) of one series.

    ``paths``, when given, must match ``datasets`` one to one; they name the files in
    error messages and become ``Volume.source_paths`` (in slice order).

    Raises
    ------
    ImagingError
        If the datasets do not form one regular stack of single-frame slices.
    """
    if paths and len(paths) != len(datasets):
        raise ImagingError(f"got {len(paths)} paths for {len(datasets)} datasets")
    builder = _VolumeBuilder(len(datasets))
    for index, ds in enumerate(datasets):
        builder.add(ds, _label(index, ds, paths))
    return builder.build(paths)


def load_volume(paths: Sequence[Path]) -> Volume:
    """Read the files of one series and build its :class:`Volume`.

    Files are read and decoded one at a time (compressed transfer syntaxes through the
    pylibjpeg plugins) straight into the preallocated float32 volume, so peak memory is
    the volume plus one dataset.

    Raises
    ------
    ImagingError
        If a file is not DICOM or cannot be decoded, or the files do not form one
        regular stack of single-frame slices.
    """
    paths = [Path(p) for p in paths]
    builder = _VolumeBuilder(len(paths))
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            raise ImagingError(f"{path}: not a readable DICOM file: {exc}") from exc
        builder.add(ds, str(path))
        del ds
    return builder.build(paths)
