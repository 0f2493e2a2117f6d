"""Checks and attributes shared by the SEG and SR builders.

Everything here validates or describes *our* inputs (:class:`PipelineResult`, the source
datasets) before highdicom sees them, so that an invalid argument fails with an
:class:`OutputError` naming it, never halfway through building an object (STYLE #3).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode import __version__
from dicomnode.errors import OutputError
from dicomnode.inference.card import Code
from dicomnode.pipelines.results import AlgorithmInfo, PipelineResult

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
        return str(hd.UID())
    return str(generate_uid(entropy_srcs=["dicomnode-output", uid_seed, *parts]))


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


def _close(a: Sequence[float], b: Sequence[float], tol: float) -> bool:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), atol=tol, rtol=0.0))


def check_source_datasets(result: PipelineResult, source_datasets: Sequence[Dataset]) -> None:
    """The source datasets must be the volume's slices, in the volume's slice order.

    Checks, slice by slice, the SOP Instance UID against ``result.volume.sop_instance_uids``,
    the study/series/frame-of-reference UIDs, the matrix size and the geometry
    (ImagePositionPatient of slice k == ``volume.slice_position(k)``, same orientation), so
    that mask index k is written on the frame that references ``source_datasets[k]``.
    """
    volume = result.volume
    n_slices, rows, columns = volume.shape
    if isinstance(source_datasets, Dataset) or not isinstance(source_datasets, Sequence):
        raise OutputError("source_datasets must be a sequence of pydicom Datasets")
    if len(source_datasets) != n_slices:
        raise OutputError(
            f"source_datasets has {len(source_datasets)} datasets, "
            f"result.volume has {n_slices} slices"
        )
    orientation = (*volume.row_direction, *volume.column_direction)
    position_tol = 0.5 * min(volume.slice_spacing, *volume.pixel_spacing)
    for k, ds in enumerate(source_datasets):
        where = f"source_datasets[{k}]"
        if not isinstance(ds, Dataset):
            raise OutputError(f"{where} is a {type(ds).__name__}, not a pydicom Dataset")
        uid = ds.get("SOPInstanceUID")
        if uid != volume.sop_instance_uids[k]:
            raise OutputError(
                f"{where} has SOPInstanceUID {uid}, but result.volume slice {k} is "
                f"{volume.sop_instance_uids[k]}: pass the datasets in the volume's slice order"
            )
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
        position = ds.get("ImagePositionPatient")
        iop = ds.get("ImageOrientationPatient")
        if position is None or iop is None:
            raise OutputError(f"{where} has no ImagePositionPatient/ImageOrientationPatient")
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
