"""What one instance tells the volume builder: image or not, and each frame's geometry.

A single-frame image (CT, MR, PET Image Storage ...) is one frame, numbered 0.  An
enhanced multi-frame image (Enhanced CT/MR/PET, Legacy Converted Enhanced; PS3.3 C.7.6.16)
is one frame per item of its Per-Frame Functional Groups Sequence, numbered from 1; each
frame takes its geometry and rescale from its functional groups, the per-frame item first,
then the shared one: Plane Orientation (Patient), Plane Position (Patient), Pixel Measures,
Pixel Value Transformation (PS3.3 C.7.6.16.2).

Numbers in messages print as people write them (``0.5``, never ``np.float64(0.5)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicomnode.errors import ImagingError

#: Reasons an instance is left out of a volume (:func:`left_out_reason`).
NOT_AN_IMAGE = "not an image"
LOCALIZER = "localizer"
NO_GEOMETRY = "without patient geometry"
NOT_GREYSCALE = "not grey-scale"

#: Attributes that tell the phases, echoes or acquisitions of one series apart, in the
#: order they are tried; the enhanced ones are read from the functional groups.
PHASE_ATTRIBUTES = (
    "TemporalPositionIdentifier",
    "TemporalPositionIndex",
    "StackID",
    "AcquisitionNumber",
    "FrameAcquisitionNumber",
    "EchoNumbers",
    "EchoTime",
    "EffectiveEchoTime",
    "TriggerTime",
    "NominalCardiacTriggerDelayTime",
    "DiffusionBValue",
    "AcquisitionTime",
    "FrameAcquisitionDateTime",
)
_CLASSIC_PHASE = (
    "TemporalPositionIdentifier",
    "AcquisitionNumber",
    "EchoNumbers",
    "EchoTime",
    "TriggerTime",
    "DiffusionBValue",
    "AcquisitionTime",
)
_ENHANCED_PHASE = {  # keyword: the functional group macro that holds it
    "TemporalPositionIndex": "FrameContentSequence",
    "StackID": "FrameContentSequence",
    "FrameAcquisitionNumber": "FrameContentSequence",
    "FrameAcquisitionDateTime": "FrameContentSequence",
    "EffectiveEchoTime": "MREchoSequence",
    "NominalCardiacTriggerDelayTime": "CardiacSynchronizationSequence",
    "DiffusionBValue": "MRDiffusionSequence",
}
_REQUIRED = ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")
#: Storage SOP classes of images whose name lacks "Image Storage".
_OTHER_IMAGE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.6.2"})  # Enhanced US Volume


@dataclass(frozen=True)
class InstanceHeader:
    """What all frames of one instance share."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    instance_number: int | None

    @classmethod
    def of(cls, ds: Dataset) -> InstanceHeader:
        return cls(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
            modality=str(ds.get("Modality", "")),
            instance_number=_instance_number(ds),
        )


@dataclass(frozen=True, eq=False)
class FrameHeader:
    """One frame (a slice to be) with what the geometry checks and the decoder need.

    ``source`` indexes the instance among those given; ``frame`` is the 1-based frame
    number in a multi-frame instance, 0 for a single-frame one.  ``rescale`` is (slope,
    intercept) from the functional groups, None where the instance's own attributes
    (Rescale Slope/Intercept or a Modality LUT) apply.
    """

    label: str
    source: int
    frame: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    orientation: npt.NDArray[np.float64]  # six direction cosines
    position: npt.NDArray[np.float64]
    slice_thickness: float | None
    rescale: tuple[float, float] | None
    instance: InstanceHeader
    phase: tuple[tuple[str, str], ...]  # (keyword, value) of the PHASE_ATTRIBUTES present

    def phase_value(self, keyword: str) -> str | None:
        return dict(self.phase).get(keyword)


def plain(value: object) -> str:
    """A value as people write it: ``2`` for DS "2.0", ``1\\2`` for several values."""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(plain(v) for v in value)
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number == round(number) and abs(number) < 1e15:
            return str(round(number))
        return f"{number:g}"
    return str(value).strip()


def format_numbers(values: Iterable[object]) -> str:
    """``1, 0, 0`` for any sequence of numbers (numpy or DICOM)."""
    return ", ".join(plain(v) for v in values)


def format_mm(point: npt.NDArray[np.float64] | Sequence[float]) -> str:
    """A patient position as ``(x, y, z)`` in mm, two decimals."""
    return "(" + ", ".join(f"{float(x):.2f}" for x in point) + ")"


def is_multiframe(ds: Dataset) -> bool:
    """An enhanced multi-frame image: its geometry is in functional groups."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def sop_class_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return UID(str(uid)).name if uid else "no SOP Class UID"


def _is_image_class(uid: str) -> bool:
    name = UID(uid).name
    if name == uid:  # unknown to pydicom (private or newer than it): judge by the header
        return False
    return "Image Storage" in name or uid in _OTHER_IMAGE_CLASSES


def left_out_reason(ds: Dataset) -> tuple[str, str] | None:
    """Why an instance cannot be a slice of a volume, as (reason, detail), or None.

    Not an image (SR, SEG, KOS, presentation state, RT, encapsulated document ...: its SOP
    class is no image storage class); a localizer (ImageType value 3 LOCALIZER); colour;
    no patient geometry (a screen capture, a multi-frame image without functional groups).
    """
    sop_class = str(ds.get("SOPClassUID", "") or "")
    known = bool(sop_class) and UID(sop_class).name != sop_class
    if known and not _is_image_class(sop_class):
        return NOT_AN_IMAGE, sop_class_name(ds)
    if not known and ("Rows" not in ds or "Columns" not in ds):
        return NOT_AN_IMAGE, sop_class_name(ds)
    image_type = ds.get("ImageType")
    values = [image_type] if isinstance(image_type, str) else list(image_type or [])
    if len(values) > 2 and str(values[2]).upper() == "LOCALIZER":
        return LOCALIZER, "ImageType LOCALIZER"
    samples = ds.get("SamplesPerPixel")
    if samples not in (None, "") and int(samples) != 1:
        return NOT_GREYSCALE, str(ds.get("PhotometricInterpretation", "")).strip()
    missing = _missing_geometry(ds)
    if missing:
        return NO_GEOMETRY, missing
    return None


def _missing_geometry(ds: Dataset) -> str:
    """What keeps an image from having patient geometry, or ""."""
    if is_multiframe(ds):
        if not ds.get("PerFrameFunctionalGroupsSequence"):
            return "no Per-Frame Functional Groups Sequence"
        groups = _groups(ds, 0)
        missing = [
            name
            for name, keyword in (
                ("PlaneOrientationSequence", "ImageOrientationPatient"),
                ("PlanePositionSequence", "ImagePositionPatient"),
                ("PixelMeasuresSequence", "PixelSpacing"),
            )
            if _macro_value(groups, name, keyword) is None
        ]
        return f"no {', '.join(missing)} in the functional groups" if missing else ""
    frames = ds.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) > 1:
        return f"{int(frames)} frames without a Per-Frame Functional Groups Sequence"
    missing = [k for k in _REQUIRED if ds.get(k) in (None, "", [])]
    return f"no {', '.join(missing)}" if missing else ""


def _floats(value: Any, keyword: str, count: int, label: str) -> list[float]:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ImagingError(f"{label}: {keyword} is not numeric: {format_numbers(values)}") from exc
    if len(floats) != count or not all(math.isfinite(v) for v in floats):
        raise ImagingError(
            f"{label}: {keyword} must have {count} finite values, got "
            f"{format_numbers(values) or 'none'}"
        )
    return floats


def _geometry(
    label: str,
    spacing: object,
    orientation: object,
    position: object,
) -> tuple[tuple[float, float], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    row_spacing, column_spacing = _floats(spacing, "PixelSpacing", 2, label)
    if row_spacing <= 0 or column_spacing <= 0:
        raise ImagingError(
            f"{label}: PixelSpacing must be positive, got "
            f"{format_numbers([row_spacing, column_spacing])}"
        )
    cosines = np.array(_floats(orientation, "ImageOrientationPatient", 6, label))
    row, col = cosines[:3], cosines[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(float(row @ col)) > 1e-3
    ):
        raise ImagingError(
            f"{label}: ImageOrientationPatient is not two orthogonal unit vectors: "
            f"{format_numbers(cosines)}"
        )
    point = np.array(_floats(position, "ImagePositionPatient", 3, label))
    return (row_spacing, column_spacing), cosines, point


def _thickness(value: Any) -> float | None:
    if value in (None, ""):
        return None
    thickness = float(value)
    return thickness if math.isfinite(thickness) else None


def _size(ds: Dataset, label: str) -> tuple[int, int]:
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows < 1 or columns < 1:
        raise ImagingError(f"{label}: Rows and Columns must be positive, got {rows}x{columns}")
    return rows, columns


def _instance_number(ds: Dataset) -> int | None:
    value = ds.get("InstanceNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def read_frames(ds: Dataset, label: str, source: int = 0) -> list[FrameHeader]:
    """The frames of one image instance, in frame order, with their geometry.

    Raises
    ------
    ImagingError
        If the geometry is missing or makes no sense; the message names the file (and
        frame) and the attribute.
    """
    if is_multiframe(ds):
        return _read_multiframe(ds, label, source)
    frames = ds.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) > 1:
        raise ImagingError(
            f"{label}: multi-frame image (NumberOfFrames {int(frames)}) without a Per-Frame "
            "Functional Groups Sequence: no geometry per frame"
        )
    missing = [k for k in _REQUIRED if ds.get(k) in (None, "", [])]
    if missing:
        raise ImagingError(f"{label}: missing geometry attribute(s) {', '.join(missing)}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImagingError(f"{label}: only single-sample (grey-scale) images are supported")
    rows, columns = _size(ds, label)
    spacing, orientation, position = _geometry(
        label, ds.PixelSpacing, ds.ImageOrientationPatient, ds.ImagePositionPatient
    )
    phase = tuple((k, plain(ds.get(k))) for k in _CLASSIC_PHASE if ds.get(k) not in (None, "", []))
    return [
        FrameHeader(
            label=label,
            source=source,
            frame=0,
            rows=rows,
            columns=columns,
            pixel_spacing=spacing,
            orientation=orientation,
            position=position,
            slice_thickness=_thickness(ds.get("SliceThickness")),
            rescale=None,
            instance=InstanceHeader.of(ds),
            phase=phase,
        )
    ]


def _groups(ds: Dataset, index: int) -> tuple[Dataset | None, Dataset | None]:
    """(per-frame item, shared item) of frame ``index`` (0-based)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    return (
        per_frame[index] if index < len(per_frame) else None,
        shared[0] if shared else None,
    )


def _macro(groups: tuple[Dataset | None, Dataset | None], name: str) -> Dataset | None:
    for group in groups:
        if group is not None and group.get(name):
            item: Dataset = group[name].value[0]
            return item
    return None


def _macro_value(groups: tuple[Dataset | None, Dataset | None], name: str, keyword: str) -> Any:
    item = _macro(groups, name)
    if item is None:
        return None
    value = item.get(keyword)
    return None if value in (None, "", []) else value


def _read_multiframe(ds: Dataset, label: str, source: int) -> list[FrameHeader]:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != count:
        raise ImagingError(
            f"{label}: NumberOfFrames is {count} but the Per-Frame Functional Groups Sequence "
            f"has {len(per_frame)} items"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImagingError(f"{label}: only single-sample (grey-scale) images are supported")
    rows, columns = _size(ds, label)
    instance = InstanceHeader.of(ds)
    headers = []
    for index in range(count):
        where = f"{label} frame {index + 1}"
        groups = _groups(ds, index)
        values = {}
        for name, keyword in (
            ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PlanePositionSequence", "ImagePositionPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"),
        ):
            values[keyword] = _macro_value(groups, name, keyword)
            if values[keyword] is None:
                raise ImagingError(
                    f"{where}: missing geometry attribute {keyword} (no {name} in the "
                    "per-frame or shared functional groups)"
                )
        spacing, orientation, position = _geometry(
            where,
            values["PixelSpacing"],
            values["ImageOrientationPatient"],
            values["ImagePositionPatient"],
        )
        phase = []
        for keyword, name in _ENHANCED_PHASE.items():
            value = _macro_value(groups, name, keyword)
            if value is not None:
                phase.append((keyword, plain(value)))
        headers.append(
            FrameHeader(
                label=where,
                source=source,
                frame=index + 1,
                rows=rows,
                columns=columns,
                pixel_spacing=spacing,
                orientation=orientation,
                position=position,
                slice_thickness=_thickness(
                    _macro_value(groups, "PixelMeasuresSequence", "SliceThickness")
                ),
                rescale=_frame_rescale(groups, where),
                instance=instance,
                phase=tuple(sorted(phase, key=lambda kv: PHASE_ATTRIBUTES.index(kv[0]))),
            )
        )
    return headers


def _frame_rescale(
    groups: tuple[Dataset | None, Dataset | None], where: str
) -> tuple[float, float]:
    """(slope, intercept) of the Pixel Value Transformation macro; identity without one."""
    slope = _macro_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _macro_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
    result = (
        1.0 if slope is None else float(slope),
        0.0 if intercept is None else float(intercept),
    )
    if not all(math.isfinite(v) for v in result) or result[0] == 0:
        raise ImagingError(
            f"{where}: RescaleSlope {plain(result[0])} / RescaleIntercept {plain(result[1])} "
            "in the Pixel Value Transformation Sequence make no sense"
        )
    return result
