"""Checks and attributes shared by the SEG and SR builders.

Everything here validates or describes *our* inputs (:class:`PipelineResult`, the source
datasets) before highdicom sees them, so that an invalid argument fails with an
:class:`OutputError` naming it, never halfway through building an object (STYLE #3).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import TypeVar

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode import __version__
from dicomnode.errors import ImagingError, OutputError
from dicomnode.imaging.headers import FrameHeader, read_frames
from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code
from dicomnode.pipelines.results import AlgorithmInfo, PipelineResult
from dicomnode.uids import UID_ROOT

ArrayT = TypeVar("ArrayT", bound=np.generic)

MANUFACTURER = "dicomnode"
DISCLAIMER_SUFFIX = " - not for diagnostic use"
LO_MAX = 64  # DICOM VR LO, the limit of SeriesDescription, SegmentLabel, Manufacturer ...

# IHE AIR: the algorithm is listed in the Contributing Equipment Sequence with this purpose.
PROCESSING_ALGORITHM = Code("1630", "99IHE", "Processing Algorithm")
IHE_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator="99IHE",
    name="IHE Code Set",
    responsible_organization="IHE International",
)

# Tolerances when matching source geometry against the Volume.  highdicom places each SEG
# frame at its source image's own position, so alignment rests on the UID check; the
# geometry check only has to tell "this is slice k" from "this is another slice": half a
# voxel, the volume's stack having been accepted with 1 % spacing jitter (imaging.series).
_DIRECTION_TOL = 2e-4


def coded(code: Code) -> hd.sr.CodedConcept:
    """Our :class:`Code` as a highdicom concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def series_description(kind: str, algorithm: AlgorithmInfo) -> str:
    """A SeriesDescription (<= 64 chars) saying the object is AI-generated, with the model.

    ``AI segmentation (lesion-seg 1.0.0) - not for diagnostic use``; a long model name is
    shortened, the disclaimer never is.
    """
    head = f"AI {kind} ("
    ident = f"{algorithm.name} {algorithm.version}"
    room = LO_MAX - len(head) - 1 - len(DISCLAIMER_SUFFIX)
    if len(ident) > room:
        ident = ident[: room - 3].rstrip() + "..."
    return f"{head}{ident}){DISCLAIMER_SUFFIX}"


def new_uid(uid_seed: str | None, *parts: str) -> str:
    """A fresh UID, or one derived from ``uid_seed`` and ``parts`` (same inputs, same UID).

    A job that is retried with the same seed writes the same SOP Instance UIDs, so a PACS
    that already stored the first attempt sees a duplicate, not a second result.
    """
    if uid_seed is None:
        return str(generate_uid(prefix=UID_ROOT))
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=["dicomnode-output", uid_seed, *parts]))


def make_reproducible(ds: Dataset, uid_seed: str, created: datetime.datetime | None) -> None:
    """Pin what highdicom draws at random or reads from the clock, so that the same inputs
    give the same bytes (a batch run again, on a cluster or locally; a job retried).

    Every Dimension Organization UID (random in highdicom) becomes one derived from
    ``uid_seed`` and the instance's SOP Instance UID.  With ``created``, the Instance
    Creation, Content and Contribution date and time are that moment instead of the
    clock's (a batch's ``--created-at`` or ``SOURCE_DATE_EPOCH``); without it they stay
    the time the object was built."""
    renamed: dict[str, str] = {}

    def pin(dataset: Dataset) -> None:
        for element in dataset:
            if element.keyword == "DimensionOrganizationUID":
                old = str(element.value)
                element.value = renamed.setdefault(
                    old,
                    new_uid(uid_seed, str(ds.SOPInstanceUID), "dimension", str(len(renamed))),
                )
            elif element.keyword == "ContributionDateTime" and created is not None:
                element.value = created.strftime("%Y%m%d%H%M%S.%f")
            elif element.VR == "SQ":
                for item in element.value:
                    pin(item)

    pin(ds)
    if created is not None:
        date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S.%f")
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        if "ContentDate" in ds:
            ds.ContentDate, ds.ContentTime = date, time


def device_observer_uid(algorithm: AlgorithmInfo) -> str:
    """A UID that is the same for every run of one algorithm version (TID 1004 Device UID)."""
    return str(
        generate_uid(
            entropy_srcs=[
                "dicomnode-algorithm",
                algorithm.manufacturer,
                algorithm.name,
                algorithm.version,
            ]
        )
    )


def algorithm_equipment(algorithm: AlgorithmInfo) -> Dataset:
    """Contributing Equipment item naming the algorithm (IHE AIR, PS3.3 C.12.1.1.5).

    highdicom's ``ContributingEquipment`` only accepts DCM purposes, so the item is built
    here and appended after construction.
    """
    item = Dataset()
    item.Manufacturer = algorithm.manufacturer
    item.ManufacturerModelName = algorithm.name
    item.SoftwareVersions = [algorithm.version, f"dicomnode {__version__}"]
    item.ContributionDescription = "AI algorithm that produced the content of this instance"
    item.PurposeOfReferenceCodeSequence = [coded(PROCESSING_ALGORITHM)]
    return item


def add_algorithm_equipment(instance: Dataset, algorithm: AlgorithmInfo) -> None:
    """Append :func:`algorithm_equipment` to the instance's Contributing Equipment."""
    sequence = list(instance.get("ContributingEquipmentSequence", []))
    sequence.append(algorithm_equipment(algorithm))
    instance.ContributingEquipmentSequence = sequence


def check_algorithm(algorithm: AlgorithmInfo, where: str = "result.algorithm") -> None:
    """AlgorithmName/Version/Manufacturer are LO: non-empty and at most 64 characters;
    each parameter (TID 4019 Algorithm Parameters, TEXT) is a non-empty string."""
    if not isinstance(algorithm, AlgorithmInfo):
        raise OutputError(f"{where} is a {type(algorithm).__name__}, not an AlgorithmInfo")
    for field in ("name", "version", "manufacturer"):
        value = getattr(algorithm, field)
        if not isinstance(value, str) or not value.strip():
            raise OutputError(f"{where}.{field} must be a non-empty string")
        if len(value) > LO_MAX or "\\" in value:
            raise OutputError(f"{where}.{field} must be at most {LO_MAX} characters without '\\'")
    check_code(algorithm.family, f"{where}.family")
    parameters = algorithm.parameters
    if isinstance(parameters, str) or not isinstance(parameters, Sequence):
        raise OutputError(f"{where}.parameters must be a tuple of strings")
    for i, parameter in enumerate(parameters):
        if not isinstance(parameter, str) or not parameter.strip():
            raise OutputError(f"{where}.parameters[{i}] must be a non-empty string")


def check_code(code: Code | None, where: str) -> Code:
    """A coded concept must be present and have value, scheme and meaning."""
    if code is None:
        raise OutputError(f"{where} is missing")
    if not (code.value and code.scheme and code.meaning):
        raise OutputError(f"{where} must have value, scheme and meaning: {code!r}")
    return code


def plain(value: object) -> object:
    """A numpy scalar as the Python number it holds, for messages: ``nan``, not
    ``np.float64(nan)``; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def numbers(values: Sequence[float]) -> str:
    """Numbers for a message, rounded: ``[0.0, -175.5, 3.333]``, not ``['0', ...]`` or
    ``[np.float64(0.0), ...]``."""
    return "[" + ", ".join(str(round(float(v), 3)) for v in values) + "]"


def classic_header(ds: Dataset) -> Dataset:
    """``ds`` as readers of single-frame headers expect it (highdicom's TID 1602 image
    library descriptors): for an enhanced multi-frame image, a shallow copy with the pixel
    spacing, slice thickness, orientation and position of frame 1 at the top level."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    flat = Dataset()
    for element in ds:
        if element.keyword not in ("PerFrameFunctionalGroupsSequence", "PixelData"):
            flat.add(element)
    per_frame = (
        ds.PerFrameFunctionalGroupsSequence[0] if ds.PerFrameFunctionalGroupsSequence else None
    )
    shared = (
        ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    )
    for macro, keywords in (
        ("PixelMeasuresSequence", ("PixelSpacing", "SliceThickness")),
        ("PlaneOrientationSequence", ("ImageOrientationPatient",)),
        ("PlanePositionSequence", ("ImagePositionPatient",)),
    ):
        for group in (per_frame, shared):
            if group is not None and group.get(macro):
                item = group[macro].value[0]
                for keyword in keywords:
                    if keyword in item:
                        flat[keyword] = item[keyword]
                break
    return flat


def referenced_frames(volume: Volume, ds: Dataset) -> list[int] | None:
    """The frames of ``ds`` that are slices of ``volume`` (ascending), or None when the
    instance is single-frame or every frame of it is a slice (a reference to it all)."""
    uid = ds.get("SOPInstanceUID")
    frames = sorted(
        volume.frame_number(k) for k, u in enumerate(volume.sop_instance_uids) if u == uid
    )
    if not frames or frames[0] == 0:
        return None
    if frames == list(range(1, int(ds.get("NumberOfFrames", 0) or 0) + 1)):
        return None
    return frames


def _close(a: Sequence[float], b: Sequence[float], tol: float) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), atol=tol, rtol=0.0))


def check_source_datasets(
    result: PipelineResult, source_datasets: Sequence[Dataset]
) -> list[Dataset]:
    """The source datasets must be the volume's source instances, in the volume's slice order.

    A single-frame series: one dataset per slice.  Checks, slice by slice, the SOP Instance
    UID against ``result.volume.sop_instance_uids``, the study/series/frame-of-reference
    UIDs, the matrix size and the geometry (ImagePositionPatient of slice k ==
    ``volume.slice_position(k)``, same orientation), so that mask index k is written on the
    frame that references ``source_datasets[k]``.

    An enhanced multi-frame source (``result.volume.source_frames`` set): the instance, once
    (or once per slice, as ``[dcmread(p) for p in volume.source_paths]`` gives it); slice k
    is checked against frame ``volume.source_frames[k]`` of it (its functional groups).

    Returns
    -------
    list[pydicom.dataset.Dataset]
        The distinct source instances, in slice order of first appearance: what the
        builders hand to highdicom.
    """
    volume = result.volume
    if isinstance(source_datasets, Dataset) or not isinstance(source_datasets, Sequence):
        raise OutputError("source_datasets must be a sequence of pydicom Datasets")
    for k, ds in enumerate(source_datasets):
        if not isinstance(ds, Dataset):
            raise OutputError(
                f"source_datasets[{k}] is a {type(ds).__name__}, not a pydicom Dataset"
            )
    if volume.is_multiframe:
        return _check_multiframe_sources(result, source_datasets)
    n_slices = volume.shape[0]
    if len(source_datasets) != n_slices:
        raise OutputError(
            f"source_datasets has {len(source_datasets)} datasets, "
            f"result.volume has {n_slices} slices"
        )
    for k, ds in enumerate(source_datasets):
        where = f"source_datasets[{k}]"
        uid = ds.get("SOPInstanceUID")
        if uid != volume.sop_instance_uids[k]:
            raise OutputError(
                f"{where} has SOPInstanceUID {uid}, but result.volume slice {k} is "
                f"{volume.sop_instance_uids[k]}: pass the datasets in the volume's slice order"
            )
        _check_instance(ds, where, result)
        position = ds.get("ImagePositionPatient")
        iop = ds.get("ImageOrientationPatient")
        if position is None or iop is None:
            raise OutputError(f"{where} has no ImagePositionPatient/ImageOrientationPatient")
        _check_slice_geometry(
            where, k, [float(v) for v in iop], [float(v) for v in position], result
        )
    return list(source_datasets)


def _check_instance(ds: Dataset, where: str, result: PipelineResult) -> None:
    """UIDs of the study, series and frame of reference, SOP class, matrix size."""
    volume = result.volume
    _, rows, columns = volume.shape
    for keyword, expected in (
        ("StudyInstanceUID", volume.study_instance_uid),
        ("SeriesInstanceUID", volume.series_instance_uid),
        ("FrameOfReferenceUID", volume.frame_of_reference_uid),
    ):
        if ds.get(keyword) != expected:
            raise OutputError(f"{where}.{keyword} is {ds.get(keyword)}, expected {expected}")
    if "SOPClassUID" not in ds:
        raise OutputError(f"{where} has no SOPClassUID")
    if (ds.get("Rows"), ds.get("Columns")) != (rows, columns):
        raise OutputError(
            f"{where} is {ds.get('Rows')}x{ds.get('Columns')}, "
            f"result.volume slices are {rows}x{columns}"
        )


def _check_slice_geometry(
    where: str,
    k: int,
    iop: Sequence[float],
    position: Sequence[float],
    result: PipelineResult,
) -> None:
    """The orientation and position of a source image (frame) are those of slice ``k``."""
    volume = result.volume
    orientation = (*volume.row_direction, *volume.column_direction)
    position_tol = 0.5 * min(volume.slice_spacing, *volume.pixel_spacing)
    if not _close(iop, orientation, _DIRECTION_TOL):
        raise OutputError(
            f"{where}.ImageOrientationPatient {numbers(iop)} differs from result.volume's "
            f"{numbers(orientation)}"
        )
    if not _close(position, volume.slice_position(k), position_tol):
        raise OutputError(
            f"{where}.ImagePositionPatient {numbers(position)} is not result.volume slice "
            f"{k} at {numbers(volume.slice_position(k))}"
        )


def _check_multiframe_sources(
    result: PipelineResult, source_datasets: Sequence[Dataset]
) -> list[Dataset]:
    volume = result.volume
    distinct: dict[str, Dataset] = {}
    for ds in source_datasets:
        distinct.setdefault(str(ds.get("SOPInstanceUID", "")), ds)
    expected = list(dict.fromkeys(volume.sop_instance_uids))
    if sorted(distinct) != sorted(expected):
        raise OutputError(
            f"source_datasets are the instance(s) {', '.join(distinct)}; result.volume's "
            f"slices are frames of {', '.join(expected)}"
        )
    frames: dict[str, dict[int, FrameHeader]] = {}
    for uid in expected:
        where = f"source instance {uid}"
        _check_instance(distinct[uid], where, result)
        try:
            headers = read_frames(distinct[uid], where)
        except ImagingError as exc:
            raise OutputError(str(exc)) from exc
        frames[uid] = {h.frame: h for h in headers}
    for k, uid in enumerate(volume.sop_instance_uids):
        number = volume.frame_number(k)
        header = frames[uid].get(number)
        if number == 0 or header is None:
            raise OutputError(
                f"result.volume slice {k} is frame {number} of {uid}, which has frames "
                f"1 to {len(frames[uid])}"
            )
        _check_slice_geometry(
            header.label, k, list(header.orientation), list(header.position), result
        )
    return [distinct[uid] for uid in expected]


def multiframe_layout(
    result: PipelineResult, source: Dataset, masks: npt.NDArray[ArrayT]
) -> tuple[npt.NDArray[ArrayT], list[hd.PlanePositionSequence] | None]:
    """The frames (SEG masks, heat map values) and plane positions to give highdicom for a
    multi-frame source.

    Every frame used once: masks in source frame order, no positions (highdicom pairs
    frame i with source frame i + 1).  Some frames: masks in slice order at the positions
    of their source frames, which highdicom matches to the source by position.
    """
    frames = np.asarray(result.volume.source_frames)
    count = int(source.NumberOfFrames)
    if sorted(frames.tolist()) == list(range(1, count + 1)):
        ordered = np.empty_like(masks)
        ordered[frames - 1] = masks
        return ordered, None
    positions = {h.frame: h.position for h in read_frames(source, "source instance")}
    planes = [
        hd.PlanePositionSequence(
            hd.CoordinateSystemNames.PATIENT, [float(v) for v in positions[int(f)]]
        )
        for f in frames
    ]
    return masks, planes
