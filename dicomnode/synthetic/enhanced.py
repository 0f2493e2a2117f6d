"""The phantom as one Enhanced CT Image instance (PS3.3 A.38), frames in dataset order.

highdicom has no Enhanced CT constructor, so the instance is built here with pydicom: the
attributes shared by all frames (orientation, pixel measures, rescale, window, anatomy,
frame type, the CT acquisition and reconstruction macros) in the Shared Functional Groups
Sequence, the position and frame content of each frame in the Per-Frame Functional Groups
Sequence, and one stack (Stack ID "1", In-Stack Position Number counting along the slice
normal) as the dimensions.  Frame ``k`` holds ``phantom.hu[k]``, so a phantom generated
with ``reverse_order`` gives frames that run against the normal.  Further phases (phantoms
of the same geometry, e.g. another seed) follow as Temporal Position Index 2, 3 ..., the
way a perfusion or multiphase scanner stores them in one instance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicomnode.synthetic.phantom import BITS_STORED, RESCALE_INTERCEPT, Phantom, file_meta

_NATIVE = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)

#: Attributes of the classic header that the enhanced instance keeps at the top level.
_TOP_LEVEL = (
    "SpecificCharacterSet",
    "StudyDate",
    "SeriesDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "ContentTime",
    "AccessionNumber",
    "Modality",
    "Manufacturer",
    "InstitutionName",
    "ReferringPhysicianName",
    "StationName",
    "StudyDescription",
    "SeriesDescription",
    "ManufacturerModelName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "BodyPartExamined",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "PatientPosition",
    "StudyInstanceUID",
    "StudyID",
    "SeriesNumber",
    "AcquisitionNumber",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "LossyImageCompression",
)


def _item(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _ct_macros(first: Dataset, frame_type: Sequence[str]) -> dict[str, list[Dataset]]:
    """The CT-specific functional groups an ORIGINAL frame needs (PS3.3 C.8.15.3)."""
    position = [float(v) for v in first.ImagePositionPatient]
    return {
        "CTImageFrameTypeSequence": [
            _item(
                FrameType=list(frame_type),
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ],
        "CTAcquisitionTypeSequence": [
            _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
        ],
        "CTAcquisitionDetailsSequence": [
            _item(
                DataCollectionDiameter=first.DataCollectionDiameter,
                GantryDetectorTilt=first.GantryDetectorTilt,
                TableHeight=first.TableHeight,
                RotationDirection=first.RotationDirection,
                RevolutionTime=first.RevolutionTime,
                SingleCollimationWidth=first.SingleCollimationWidth,
                TotalCollimationWidth=first.TotalCollimationWidth,
            )
        ],
        "CTTableDynamicsSequence": [
            _item(
                TableSpeed=39.36,
                TableFeedPerRotation=39.36,
                SpiralPitchFactor=first.SpiralPitchFactor,
            )
        ],
        "CTGeometrySequence": [
            _item(
                DistanceSourceToDetector=float(first.DistanceSourceToDetector),
                DistanceSourceToDataCollectionCenter=float(first.DistanceSourceToPatient),
            )
        ],
        "CTReconstructionSequence": [
            _item(
                ReconstructionAlgorithm="FILTER_BACK_PROJ",
                ConvolutionKernel=first.ConvolutionKernel,
                ConvolutionKernelGroup="SOFT_TISSUE",
                ReconstructionDiameter=float(first.ReconstructionDiameter),
                ReconstructionPixelSpacing=[float(v) for v in first.PixelSpacing],
                ReconstructionAngle=360.0,
                ImageFilter="NONE",
            )
        ],
        "CTExposureSequence": [
            _item(
                ExposureTimeInms=float(first.ExposureTime),
                XRayTubeCurrentInmA=float(first.XRayTubeCurrent),
                ExposureInmAs=float(first.Exposure),
                ExposureModulationType="NONE",
                CTDIvol=first.CTDIvol,
                CTDIPhantomTypeCodeSequence=first.CTDIPhantomTypeCodeSequence,
            )
        ],
        "CTXRayDetailsSequence": [
            _item(
                KVP=first.KVP,
                FocalSpots=[1.2],
                FilterType=first.FilterType,
                FilterMaterial=["ALUMINUM"],
            )
        ],
        "CTPositionSequence": [
            _item(
                TablePosition=-position[2],
                ReconstructionTargetCenterPatient=[0.0, 0.0, position[2]],
                DataCollectionCenterPatient=[0.0, 0.0, position[2]],
            )
        ],
    }


def _shared_groups(phantom: Phantom, frame_type: Sequence[str]) -> Dataset:
    first = phantom.datasets[0]
    shared = _item(
        PixelMeasuresSequence=[
            _item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=first.ImageOrientationPatient)],
        PixelValueTransformationSequence=[
            _item(
                RescaleIntercept=first.RescaleIntercept,
                RescaleSlope=first.RescaleSlope,
                RescaleType="HU",
            )
        ],
        FrameVOILUTSequence=[_item(WindowCenter=first.WindowCenter, WindowWidth=first.WindowWidth)],
        FrameAnatomySequence=[
            _item(
                AnatomicRegionSequence=[_code("51185008", "SCT", "Thorax")],
                FrameLaterality="U",
            )
        ],
        IrradiationEventIdentificationSequence=[_item(IrradiationEventUID=generate_uid())],
    )
    for keyword, value in _ct_macros(first, frame_type).items():
        setattr(shared, keyword, value)
    return shared


def _per_frame_groups(phantom: Phantom, acquired: str, phase: int = 0) -> list[Dataset]:
    """Position and frame content of each frame; In-Stack Position 1 at the start of the
    normal, so the dimension index orders the frames in space whatever their order.
    ``phase`` > 0: the Temporal Position Index, first dimension."""
    first = phantom.datasets[0]
    row, column = (
        np.asarray([float(v) for v in first.ImageOrientationPatient[i : i + 3]]) for i in (0, 3)
    )
    normal = np.cross(row, column)
    distances = [
        float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal)
        for ds in phantom.datasets
    ]
    rank = {k: i + 1 for i, k in enumerate(np.argsort(distances, kind="stable"))}
    items = []
    for k, ds in enumerate(phantom.datasets):
        content = _item(
            FrameAcquisitionNumber=1,
            FrameReferenceDateTime=acquired,
            FrameAcquisitionDateTime=acquired,
            FrameAcquisitionDuration=500.0,
            StackID="1",
            InStackPositionNumber=rank[k],
            DimensionIndexValues=[1, rank[k]] if phase == 0 else [phase, 1, rank[k]],
        )
        if phase:
            content.TemporalPositionIndex = phase
        items.append(
            _item(
                FrameContentSequence=[content],
                PlanePositionSequence=[_item(ImagePositionPatient=ds.ImagePositionPatient)],
            )
        )
    return items


def _dimensions(ds: Dataset, phases: int) -> None:
    organization = generate_uid()
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organization)]
    ds.DimensionOrganizationType = "3D" if phases == 1 else "3D_TEMPORAL"
    temporal = _item(
        DimensionOrganizationUID=organization,
        DimensionIndexPointer=Tag("TemporalPositionIndex"),
        FunctionalGroupPointer=Tag("FrameContentSequence"),
        DimensionDescriptionLabel="Temporal Position Index",
    )
    ds.DimensionIndexSequence = ([temporal] if phases > 1 else []) + [
        _item(
            DimensionOrganizationUID=organization,
            DimensionIndexPointer=Tag("StackID"),
            FunctionalGroupPointer=Tag("FrameContentSequence"),
            DimensionDescriptionLabel="Stack ID",
        ),
        _item(
            DimensionOrganizationUID=organization,
            DimensionIndexPointer=Tag("InStackPositionNumber"),
            FunctionalGroupPointer=Tag("FrameContentSequence"),
            DimensionDescriptionLabel="In-Stack Position Number",
        ),
    ]


def enhanced_dataset(
    phantom: Phantom,
    *,
    series_instance_uid: str | None = None,
    later_phases: Sequence[Phantom] = (),
) -> Dataset:
    """The phantom as one Enhanced CT Image instance (see the module docstring).

    Study, frame of reference and patient are the phantom's; the series is new unless
    ``series_instance_uid`` is given.  The transfer syntax is ``phantom.spec``'s.
    ``later_phases``: phantoms at the same positions, stored after the phantom's frames as
    Temporal Position Index 2, 3 ... (the phantom's frames then have index 1).
    """
    phases = [phantom, *later_phases]
    for other in later_phases:
        same = [
            [float(v) for v in a.ImagePositionPatient] == [float(v) for v in b.ImagePositionPatient]
            for a, b in zip(phantom.datasets, other.datasets, strict=True)
        ]
        if not all(same) or other.hu.shape != phantom.hu.shape:
            raise ValueError("later_phases must have the phantom's geometry")
    first = phantom.datasets[0]
    ds = Dataset()
    for keyword in _TOP_LEVEL:
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.InstanceNumber = 1
    ds.InstanceCreationDate, ds.InstanceCreationTime = first.StudyDate, first.StudyTime
    acquired = f"{first.StudyDate}{first.StudyTime}"
    frame_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.ImageType = frame_type
    ds.AcquisitionDateTime = acquired
    ds.AcquisitionDuration = 500.0 * len(phantom.datasets) * len(phases)
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = []
    ds.NumberOfFrames = len(phantom.datasets) * len(phases)
    _dimensions(ds, len(phases))
    ds.SharedFunctionalGroupsSequence = [_shared_groups(phantom, frame_type)]
    ds.PerFrameFunctionalGroupsSequence = [
        item
        for index, each in enumerate(phases)
        for item in _per_frame_groups(each, acquired, index + 1 if later_phases else 0)
    ]
    hu = np.concatenate([each.hu for each in phases])
    stored = (hu - RESCALE_INTERCEPT).astype(np.uint16)
    assert int(stored.max(initial=0)) < 2**BITS_STORED
    meta = ds.file_meta = file_meta(ds)
    syntax = phantom.spec.transfer_syntax
    if syntax in _NATIVE:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        meta.TransferSyntaxUID = UID(syntax)
    else:
        ds.compress(UID(syntax), stored, generate_instance_uid=False)
    return ds
