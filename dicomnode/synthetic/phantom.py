"""Synthetic CT chest studies with known ground truth, for tests and model training.

:func:`generate_phantom` builds one CT Image Storage series (PS3.3 A.3) of an elliptical
body with fat rim, two lungs, a spine and spherical lesions, in any slice orientation and
order.  Every tissue is defined in patient coordinates (LPS, mm) and sampled at each voxel
centre, so the masks are exact ground truth whatever the orientation, slice order or pixel
spacing.  :func:`write_phantom` writes the series as DICOM Part 10 files,
:func:`write_phantom_enhanced` as one Enhanced CT Image instance
(:mod:`dicomnode.synthetic.enhanced`).

Anatomy (patient coordinates, the volume centre at the origin):

- body: elliptic cylinder along z, semi-axes 160 mm (x) and 115 mm (y), soft tissue 40 HU
  inside a fat rim of -100 HU (the outer 10 mm);
- lungs: ellipsoids at x = +/-70 mm, y = -5 mm, semi-axes (50, 75, 200) mm, -850 HU;
- spine: cylinder along z at y = +85 mm (posterior), radius 18 mm, 700 HU;
- air outside the body, -1000 HU; lesions are spheres of their own HU, drawn last.
"""

from __future__ import annotations

import copy
import datetime
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from dicomnode.errors import ImagingError

Vec3 = tuple[float, float, float]

#: Transfer syntaxes :func:`generate_phantom` can encode.  JPEG Lossless SV1
#: (1.2.840.10008.1.2.4.70) is not among them: pydicom 3 has no encoder for it (decoding
#: works); convert a written phantom with ``dcmcjpeg +e1`` (dcmtk) when one is needed.
ENCODABLE_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        RLELossless,
    }
)
_NATIVE_TRANSFER_SYNTAXES = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -850.0
BONE_HU = 700.0
RESCALE_INTERCEPT = -1024
BITS_STORED = 12

_BODY_SEMI_AXES = (160.0, 115.0)
_FAT_RIM_MM = 10.0
_LUNG_CENTRES = ((70.0, -5.0, 0.0), (-70.0, -5.0, 0.0))
_LUNG_SEMI_AXES = (50.0, 75.0, 200.0)
_SPINE_CENTRE = (0.0, 85.0)
_SPINE_RADIUS = 18.0
_OBLIQUE_TILT_DEG = 20.0


@dataclass(frozen=True)
class Lesion:
    """A spherical lesion; ``center_mm`` in patient coordinates (LPS, mm)."""

    center_mm: Vec3
    radius_mm: float
    hu: float = 60.0


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate.  ``pixel_spacing`` is (row spacing, column spacing) in mm.

    ``orientation`` is ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"oblique"`` (axial
    with a 20 degree gantry tilt about the patient's left-right axis).  ``reverse_order``
    makes positions run against the slice normal (row x column direction) while instance
    numbers still count 1..n.  ``lesions=None`` places ``n_lesions`` random, non-overlapping
    lesions inside the lungs and inside the imaged volume.
    """

    rows: int = 256
    columns: int = 256
    slices: int = 64
    pixel_spacing: tuple[float, float] = (1.4, 1.4)
    slice_thickness: float = 2.5
    orientation: str = "axial"
    reverse_order: bool = False
    lesions: tuple[Lesion, ...] | None = None
    n_lesions: int = 3
    lesion_radius_mm: tuple[float, float] = (5.0, 12.0)
    lesion_hu: tuple[float, float] = (20.0, 80.0)
    noise_hu: float = 12.0
    seed: int = 0
    transfer_syntax: str = ExplicitVRLittleEndian
    patient_name: str = "PHANTOM^SYNTHETIC"
    patient_id: str = "PH0001"
    patient_birth_date: str = "19700101"
    patient_sex: str = "O"
    accession_number: str = "ACC0001"
    study_id: str = "1"
    study_description: str = "CT CHEST PHANTOM"
    series_description: str | None = None
    series_number: int = 1
    referring_physician_name: str = "REFERRING^PHYSICIAN"
    study_datetime: datetime.datetime = datetime.datetime(2024, 1, 15, 9, 30, 0)
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None


@dataclass
class Phantom:
    """A generated series with its ground truth.

    ``hu`` (float32, shape (slices, rows, columns)) holds exactly the values stored in the
    datasets after the rescale: noise added, rounded to integers and clipped to the 12-bit
    stored range (-1024..3071).  ``hu``, ``mask`` and ``lesion_masks`` are in the order of
    ``datasets`` (generation order, instance numbers 1..n), which runs against the slice
    normal when ``spec.reverse_order`` is set.  ``mask`` is True where a voxel centre lies
    inside any lesion.
    """

    spec: PhantomSpec
    datasets: list[Dataset]
    hu: npt.NDArray[np.float32]
    mask: npt.NDArray[np.bool_]
    lesion_masks: list[npt.NDArray[np.bool_]]
    lesions: tuple[Lesion, ...]


@dataclass(frozen=True)
class _Geometry:
    row_direction: npt.NDArray[np.float64]  # along which the column index grows
    column_direction: npt.NDArray[np.float64]
    normal: npt.NDArray[np.float64]
    positions: npt.NDArray[np.float64]  # (slices, 3), in generation order
    iop: tuple[DSfloat, ...]


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _directions(orientation: str) -> tuple[Vec3, Vec3]:
    if orientation == "axial":
        return (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    if orientation == "coronal":
        return (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)
    if orientation == "sagittal":
        return (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
    if orientation == "oblique":
        t = math.radians(_OBLIQUE_TILT_DEG)
        return (1.0, 0.0, 0.0), (0.0, math.cos(t), -math.sin(t))
    raise ImagingError(
        f"PhantomSpec.orientation must be axial, coronal, sagittal or oblique, not {orientation!r}"
    )


def _geometry(spec: PhantomSpec) -> _Geometry:
    row_dir, col_dir = _directions(spec.orientation)
    # Round through DS so the ground truth uses exactly the geometry written to the files.
    iop = tuple(_ds(v) for v in (*row_dir, *col_dir))
    row = np.array([float(v) for v in iop[:3]])
    col = np.array([float(v) for v in iop[3:]])
    normal = np.cross(row, col)
    dr, dc = spec.pixel_spacing
    steps = np.arange(spec.slices, dtype=np.float64) - (spec.slices - 1) / 2.0
    if spec.reverse_order:
        steps = steps[::-1]
    corner = -((spec.columns - 1) / 2.0) * dc * row - ((spec.rows - 1) / 2.0) * dr * col
    raw = corner[None, :] + steps[:, None] * spec.slice_thickness * normal[None, :]
    positions = np.vectorize(lambda v: float(_ds(v)))(raw) if raw.size else raw
    return _Geometry(row, col, normal, np.asarray(positions, dtype=np.float64), iop)


def _validate(spec: PhantomSpec) -> None:
    if spec.rows < 2 or spec.columns < 2 or spec.slices < 1:
        raise ImagingError(
            f"PhantomSpec needs rows, columns >= 2 and slices >= 1, got "
            f"{spec.rows}x{spec.columns}x{spec.slices}"
        )
    if min(spec.pixel_spacing) <= 0 or spec.slice_thickness <= 0:
        raise ImagingError("PhantomSpec.pixel_spacing and slice_thickness must be positive")
    if spec.transfer_syntax not in ENCODABLE_TRANSFER_SYNTAXES:
        if spec.transfer_syntax == JPEGLosslessSV1:
            raise ImagingError(
                "PhantomSpec.transfer_syntax JPEG Lossless SV1 cannot be encoded: pydicom 3 "
                "has no encoder for it; write the phantom uncompressed and convert it with "
                "dcmtk's 'dcmcjpeg +e1'"
            )
        raise ImagingError(
            f"PhantomSpec.transfer_syntax {spec.transfer_syntax!r} is not supported; use one of "
            + ", ".join(sorted(ENCODABLE_TRANSFER_SYNTAXES))
        )
    lo, hi = spec.lesion_radius_mm
    if spec.lesions is None and (spec.n_lesions < 0 or lo <= 0 or hi < lo):
        raise ImagingError(
            "PhantomSpec.n_lesions must be >= 0 and lesion_radius_mm a (min, max) range > 0"
        )


def _in_lung(points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    inside = np.zeros(points.shape[:-1], dtype=bool)
    for centre in _LUNG_CENTRES:
        d = (points - np.asarray(centre)) / np.asarray(_LUNG_SEMI_AXES)
        inside |= np.einsum("...i,...i->...", d, d) <= 1.0
    return inside


def _sphere_directions() -> npt.NDArray[np.float64]:
    grid = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), -1)
    dirs = grid.reshape(-1, 3).astype(np.float64)
    dirs = dirs[np.any(dirs != 0, axis=1)]
    return np.asarray(dirs / np.linalg.norm(dirs, axis=1, keepdims=True))


def _random_lesions(spec: PhantomSpec, geo: _Geometry) -> tuple[Lesion, ...]:
    """Non-overlapping spheres inside a lung and inside the imaged volume."""
    rng = np.random.default_rng([spec.seed, 1])
    dr, dc = spec.pixel_spacing
    extents = np.array(
        [(spec.columns - 1) * dc, (spec.rows - 1) * dr, (spec.slices - 1) * spec.slice_thickness]
    )
    axes = np.stack([geo.row_direction, geo.column_direction, geo.normal])
    first = geo.positions[np.argmin(geo.positions @ geo.normal)]
    dirs = _sphere_directions()
    lesions: list[Lesion] = []
    for _ in range(spec.n_lesions * 2000):
        if len(lesions) == spec.n_lesions:
            break
        radius = float(rng.uniform(*spec.lesion_radius_mm))
        lung = _LUNG_CENTRES[int(rng.integers(2))]
        centre = np.asarray(lung) + rng.uniform(-1.0, 1.0, 3) * np.asarray(_LUNG_SEMI_AXES)
        local = axes @ (centre - first)
        margin = radius + 0.5 * np.array([dc, dr, spec.slice_thickness])
        if np.any(local < margin) or np.any(local > extents - margin):
            continue
        if not np.all(_in_lung(centre + radius * 1.05 * dirs)):
            continue
        if any(
            np.linalg.norm(centre - np.asarray(o.center_mm)) < radius + o.radius_mm + 2.0
            for o in lesions
        ):
            continue
        hu = round(float(rng.uniform(*spec.lesion_hu)), 1)
        c = (round(float(centre[0]), 2), round(float(centre[1]), 2), round(float(centre[2]), 2))
        lesions.append(Lesion(center_mm=c, radius_mm=round(radius, 2), hu=hu))
    if len(lesions) < spec.n_lesions:
        raise ImagingError(
            f"could not place {spec.n_lesions} lesions inside the lungs of a "
            f"{spec.rows}x{spec.columns}x{spec.slices} {spec.orientation} volume; enlarge the "
            "field of view or pass PhantomSpec.lesions explicitly"
        )
    return tuple(lesions)


def _slice_hu(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], z: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Noise-free anatomy (without lesions) at the points (x, y, z)."""
    a, b = _BODY_SEMI_AXES
    body = (x / a) ** 2 + (y / b) ** 2
    inner = (x / (a - _FAT_RIM_MM)) ** 2 + (y / (b - _FAT_RIM_MM)) ** 2
    hu = np.full(x.shape, AIR_HU, dtype=np.float32)
    hu[body <= 1.0] = FAT_HU
    hu[inner <= 1.0] = SOFT_TISSUE_HU
    la, lb, lc = _LUNG_SEMI_AXES
    for cx, cy, cz in _LUNG_CENTRES:
        lung = ((x - cx) / la) ** 2 + ((y - cy) / lb) ** 2 + ((z - cz) / lc) ** 2
        hu[lung <= 1.0] = LUNG_HU
    sx, sy = _SPINE_CENTRE
    hu[(x - sx) ** 2 + (y - sy) ** 2 <= _SPINE_RADIUS**2] = BONE_HU
    return hu


def generate_phantom(spec: PhantomSpec = PhantomSpec()) -> Phantom:
    """Generate a synthetic CT series and its ground truth (see the module docstring).

    Pixel data are deterministic for a given ``spec`` (``spec.seed`` drives the noise and
    the random lesions); UIDs not given in ``spec`` are new on every call.
    """
    _validate(spec)
    geo = _geometry(spec)
    lesions = spec.lesions if spec.lesions is not None else _random_lesions(spec, geo)
    shape = (spec.slices, spec.rows, spec.columns)
    hu = np.empty(shape, dtype=np.float32)
    lesion_masks = [np.zeros(shape, dtype=bool) for _ in lesions]
    dr, dc = spec.pixel_spacing
    # Offsets of the pixel centres from the slice position, per axis: (rows, columns).
    r_off = (np.arange(spec.rows)[:, None] * dr) * geo.column_direction[None, :]
    c_off = (np.arange(spec.columns)[:, None] * dc) * geo.row_direction[None, :]
    rng = np.random.default_rng([spec.seed, 0])
    for k, position in enumerate(geo.positions):
        xyz = [
            (position[i] + r_off[:, i][:, None] + c_off[:, i][None, :]).astype(np.float32)
            for i in range(3)
        ]
        slice_hu = _slice_hu(*xyz)
        for lesion, lesion_mask in zip(lesions, lesion_masks, strict=True):
            centre = np.asarray(lesion.center_mm)
            if abs(float((centre - position) @ geo.normal)) > lesion.radius_mm:
                continue
            d2 = sum((xyz[i] - np.float32(centre[i])) ** 2 for i in range(3))
            inside = d2 <= np.float32(lesion.radius_mm**2)
            lesion_mask[k] = inside
            slice_hu[inside] = lesion.hu
        if spec.noise_hu > 0:
            slice_hu += rng.standard_normal(slice_hu.shape, dtype=np.float32) * spec.noise_hu
        np.rint(slice_hu, out=slice_hu)
        np.clip(slice_hu, RESCALE_INTERCEPT, RESCALE_INTERCEPT + 2**BITS_STORED - 1, out=slice_hu)
        hu[k] = slice_hu
    mask = np.zeros(shape, dtype=bool)
    for lesion_mask in lesion_masks:
        mask |= lesion_mask
    datasets = _build_datasets(spec, geo, hu)
    return Phantom(spec, datasets, hu, mask, lesion_masks, tuple(lesions))


def _study_header(spec: PhantomSpec, uids: dict[str, str]) -> Dataset:
    """Attributes shared by every instance of the series."""
    when = spec.study_datetime
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = spec.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "dicomnode phantom"
    ds.InstitutionName = "dicomnode"
    ds.ReferringPhysicianName = spec.referring_physician_name
    ds.StationName = "PHANTOM"
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.series_description or f"PHANTOM {spec.orientation.upper()}"
    ds.ManufacturerModelName = "generate_phantom"
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(spec.slice_thickness)
    ds.KVP = _ds(120)
    ds.DataCollectionDiameter = _ds(500)
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "dicomnode"
    ds.ReconstructionDiameter = _ds(
        max(spec.rows * spec.pixel_spacing[0], spec.columns * spec.pixel_spacing[1])
    )
    ds.DistanceSourceToDetector = _ds(1085.6)
    ds.DistanceSourceToPatient = _ds(595)
    ds.GantryDetectorTilt = _ds(_OBLIQUE_TILT_DEG if spec.orientation == "oblique" else 0)
    ds.TableHeight = _ds(150)
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 200
    ds.Exposure = 100
    ds.FilterType = "BODY"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.SpiralPitchFactor = 0.984
    ds.CTDIvol = 8.0
    phantom_type = Dataset()
    phantom_type.CodeValue = "113691"
    phantom_type.CodingSchemeDesignator = "DCM"
    phantom_type.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = [phantom_type]
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = spec.study_id
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [_ds(spec.pixel_spacing[0]), _ds(spec.pixel_spacing[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(-600)
    ds.WindowWidth = _ds(1500)
    ds.WindowCenterWidthExplanation = "LUNG"
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = _ds(1)
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    return ds


def _copy_header(header: Dataset) -> Dataset:
    """A copy sharing no element or list with ``header`` (cheaper than deepcopy)."""
    ds = Dataset()
    for elem in header:
        value = elem.value
        if elem.VR == "SQ":
            value = copy.deepcopy(value)
        elif isinstance(value, MultiValue):
            value = list(value)
        ds.add(DataElement(elem.tag, elem.VR, value))
    return ds


def file_meta(ds: Dataset) -> FileMetaDataset:
    """File meta for a phantom instance, Explicit VR Little Endian until it is compressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOMNODE"
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    return meta


def _instance(
    header: Dataset, spec: PhantomSpec, geo: _Geometry, k: int, pixels: npt.NDArray[np.float32]
) -> Dataset:
    ds = _copy_header(header)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = header.StudyDate
    ds.InstanceCreationTime = header.StudyTime
    if spec.orientation in ("axial", "oblique"):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    else:
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
    ds.InstanceNumber = k + 1
    position = geo.positions[k]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = list(geo.iop)
    ds.SliceLocation = _ds(float(position @ geo.normal))
    stored = (pixels - RESCALE_INTERCEPT).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    meta = ds.file_meta = file_meta(ds)
    if spec.transfer_syntax in _NATIVE_TRANSFER_SYNTAXES:
        meta.TransferSyntaxUID = UID(spec.transfer_syntax)
    else:
        ds.compress(UID(spec.transfer_syntax), stored, generate_instance_uid=False)
    return ds


def _build_datasets(
    spec: PhantomSpec, geo: _Geometry, hu: npt.NDArray[np.float32]
) -> list[Dataset]:
    uids = {
        "study": spec.study_instance_uid or generate_uid(),
        "series": spec.series_instance_uid or generate_uid(),
        "frame": spec.frame_of_reference_uid or generate_uid(),
    }
    header = _study_header(spec, uids)
    return [_instance(header, spec, geo, k, hu[k]) for k in range(spec.slices)]


def write_phantom(phantom: Phantom, directory: Path) -> list[Path]:
    """Write each instance to ``directory/IM_<instance number>.dcm``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in phantom.datasets:
        path = directory / f"IM_{int(ds.InstanceNumber):05d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_phantom_enhanced(phantom: Phantom, directory: Path) -> Path:
    """Write the phantom as one Enhanced CT Image instance to ``directory/ENHANCED_CT.dcm``.

    Frames in the order of ``phantom.datasets``; see :mod:`dicomnode.synthetic.enhanced`.
    """
    from dicomnode.synthetic.enhanced import enhanced_dataset  # it builds on this module

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ENHANCED_CT.dcm"
    pydicom.dcmwrite(path, enhanced_dataset(phantom), enforce_file_format=True)
    return path
