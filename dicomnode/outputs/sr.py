"""TID 1500 Measurement Report (Comprehensive 3D SR) for a pipeline result.

Implements the Comprehensive 3D SR IOD (DICOM PS3.3 A.35.13) with the template
TID 1500 "Measurement Report" (PS3.16) at its root, as IHE AI Results (AIR) and OHIF read it:

- observation context (TID 1001/1004): each model is a device observer, the result's
  primary (segmentation) model first;
- procedure reported: the imaging exam (the source's ProcedureCodeSequence, else a code
  for the modality), never the algorithm;
- image library (TID 1600) listing the source images: one group whose TID 1602
  descriptors (modality, frame of reference, matrix, spacing, orientation) are shared by
  all slices, one IMAGE entry per slice.  highdicom's ``ImageLibrary`` repeats 15
  descriptors under every image, which made a 300-slice report take 5 s to build;
- one TID 1411 "Volumetric ROI Measurements" group per :class:`Finding`: tracking
  identifier and UID, finding type, the SEG segment it lies in, volume, long axis and (CT)
  mean attenuation, each with the algorithm identification (TID 4019: name, version,
  parameters) of the model that produced it;
- one TID 1501 group per :class:`Classification`: the finding present/absent and its
  probability; one TID 1501 group "absent" per segment without findings, so that a
  result with nothing found is still a complete, explicit report;
- the other objects of the result (heat maps, key object selection) beside the source
  images and the SEG in the Current Requested Procedure Evidence Sequence;
- each model in the Contributing Equipment Sequence with (1630, 99IHE, "Processing
  Algorithm"); VerificationFlag UNVERIFIED, CompletionFlag COMPLETE, PreliminaryFlag
  PRELIMINARY (nobody has read it yet).

``ReferencedSegment`` is built by hand: highdicom 0.28.2's ``from_segmentation`` fails on
the SEGs it writes itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TypeAlias

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import RE_VALID_UID, SegmentationStorage

from dicomnode.errors import OutputError
from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code
from dicomnode.outputs.common import (
    IHE_CODING_SCHEME,
    MANUFACTURER,
    add_algorithm_equipment,
    check_algorithm,
    check_code,
    check_source_datasets,
    classic_header,
    coded,
    device_observer_uid,
    new_uid,
    plain,
    referenced_frames,
    series_description,
)
from dicomnode.pipelines.results import (
    AlgorithmInfo,
    Classification,
    Finding,
    PipelineResult,
    SegmentResult,
)

logger = logging.getLogger(__name__)

# Concept names and units (PS3.16 CID 7469/7470 measurements, CID 7464 derivations,
# CID 7181 UCUM units, CID 100 procedures).
VOLUME = Code("118565006", "SCT", "Volume")
LONG_AXIS = Code("103339001", "SCT", "Long axis")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
PROBABILITY = Code("122157", "DCM", "Probability")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
CUBIC_MILLIMETER = Code("mm3", "UCUM", "cubic millimeter")
MILLIMETER = Code("mm", "UCUM", "millimeter")
HOUNSFIELD_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = Code("1", "UCUM", "no units")
CT_UNSPECIFIED = Code("25045-6", "LN", "CT unspecified body region")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging")
SOURCE = Code("260753009", "SCT", "Source")  # TID 1601 image library entry
# Triage priority (SNOMED CT "Priorities" 272125009 hierarchy): concept name and values.
PRIORITY = Code("260870009", "SCT", "Priority")
PRIORITY_CODES = {
    "urgent": Code("103391001", "SCT", "Urgent"),
    "review": Code("394849002", "SCT", "High priority"),
    "routine": Code("50811001", "SCT", "Routine"),
}

MeasurementGroup: TypeAlias = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)

_PATIENT_STUDY_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def _finite(value: float, where: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OutputError(f"{where} must be a finite number, not {plain(value)!r}")
    if minimum is not None and value < minimum:
        raise OutputError(f"{where} must be >= {minimum}, not {plain(value)!r}")
    return float(value)


def _segment_numbers(segmentation: Dataset, result: PipelineResult) -> set[int]:
    """Check the SEG belongs to the result's series; return its segment numbers."""
    volume = result.volume
    if not isinstance(segmentation, Dataset):
        raise OutputError(f"segmentation is a {type(segmentation).__name__}, not a Dataset")
    if segmentation.get("SOPClassUID") != SegmentationStorage:
        raise OutputError(
            f"segmentation has SOPClassUID {segmentation.get('SOPClassUID')}, "
            f"not Segmentation Storage ({SegmentationStorage})"
        )
    for keyword, expected in (
        ("StudyInstanceUID", volume.study_instance_uid),
        ("FrameOfReferenceUID", volume.frame_of_reference_uid),
    ):
        if segmentation.get(keyword) != expected:
            raise OutputError(
                f"segmentation.{keyword} is {segmentation.get(keyword)}, expected {expected}"
            )
    referenced = {
        item.get("SeriesInstanceUID") for item in segmentation.get("ReferencedSeriesSequence", [])
    }
    if volume.series_instance_uid not in referenced:
        raise OutputError(
            f"segmentation does not reference the source series {volume.series_instance_uid}"
        )
    return {int(item.SegmentNumber) for item in segmentation.get("SegmentSequence", [])}


def _check_findings(result: PipelineResult, segment_numbers: set[int]) -> None:
    n_slices = result.volume.shape[0]
    seen: set[str] = set()
    for i, finding in enumerate(result.findings):
        where = f"result.findings[{i}]"
        if not isinstance(finding, Finding):
            raise OutputError(f"{where} is a {type(finding).__name__}, not a Finding")
        if not finding.tracking_id or not finding.tracking_id.strip():
            raise OutputError(f"{where}.tracking_id must be a non-empty string")
        uid = finding.tracking_uid
        if not isinstance(uid, str) or len(uid) > 64 or not RE_VALID_UID.match(uid):
            raise OutputError(f"{where}.tracking_uid {finding.tracking_uid!r} is not a valid UID")
        if finding.tracking_uid in seen:
            raise OutputError(f"{where}.tracking_uid {finding.tracking_uid} is not unique")
        seen.add(finding.tracking_uid)
        if finding.segment_number not in segment_numbers:
            raise OutputError(
                f"{where}.segment_number {finding.segment_number} is not a segment of the "
                f"segmentation (segments {sorted(segment_numbers)})"
            )
        check_code(finding.label.finding, f"{where}.label.finding")
        _finite(finding.volume_mm3, f"{where}.volume_mm3", minimum=0.0)
        _finite(finding.longest_diameter_mm, f"{where}.longest_diameter_mm", minimum=0.0)
        _finite(finding.mean_hu, f"{where}.mean_hu")
        if any(not 0 <= k < n_slices for k in finding.slice_indices):
            raise OutputError(f"{where}.slice_indices lie outside the volume's {n_slices} slices")


def _check_related(related: Sequence[Dataset], result: PipelineResult) -> list[Dataset]:
    """Objects of the result's study, each with its SOP class and instance UIDs."""
    if isinstance(related, Dataset) or not isinstance(related, Sequence):
        raise OutputError("related must be a sequence of pydicom Datasets")
    study = result.volume.study_instance_uid
    for i, ds in enumerate(related):
        where = f"related[{i}]"
        if not isinstance(ds, Dataset):
            raise OutputError(f"{where} is a {type(ds).__name__}, not a pydicom Dataset")
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise OutputError(f"{where} has no SOPClassUID/SOPInstanceUID")
        if ds.get("StudyInstanceUID") != study:
            raise OutputError(
                f"{where}.StudyInstanceUID is {ds.get('StudyInstanceUID')}, expected {study}"
            )
    return list(related)


def _check_classifications(classifications: Sequence[Classification]) -> None:
    for i, item in enumerate(classifications):
        where = f"result.classifications[{i}]"
        if not isinstance(item, Classification):
            raise OutputError(f"{where} is a {type(item).__name__}, not a Classification")
        check_code(item.label.finding, f"{where}.label.finding")
        probability = _finite(item.probability, f"{where}.probability", minimum=0.0)
        if probability > 1.0:
            raise OutputError(f"{where}.probability must be in [0, 1], not {probability}")


def _check_patient_study(first: Dataset) -> None:
    missing = [k for k in _PATIENT_STUDY_KEYWORDS if k not in first]
    if missing:
        raise OutputError(
            f"source_datasets[0] lacks patient/study attribute(s) {', '.join(missing)}"
        )


def _procedure_reported(first: Dataset, modality: str, override: Code | None) -> list[CodedConcept]:
    """The exam the report is about: explicit code, the source's ProcedureCodeSequence,
    else a code for the modality (CID 100)."""
    if override is not None:
        return [coded(check_code(override, "procedure_reported"))]
    codes = [
        CodedConcept(
            value=str(item.CodeValue),
            scheme_designator=str(item.CodingSchemeDesignator),
            meaning=str(item.CodeMeaning),
        )
        for item in first.get("ProcedureCodeSequence", [])
        if item.get("CodeValue") and item.get("CodingSchemeDesignator") and item.get("CodeMeaning")
    ]
    if codes:
        return codes
    return [coded(CT_UNSPECIFIED if modality == "CT" else IMAGING_PROCEDURE)]


def _measurement(
    name: Code,
    value: float,
    unit: Code,
    algorithm_id: hd.sr.AlgorithmIdentification,
    derivation: Code | None = None,
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=coded(name),
        value=value,
        unit=coded(unit),
        derivation=None if derivation is None else coded(derivation),
        algorithm_id=algorithm_id,
    )


def _algorithm_id(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name, version, manufacturer, family and parameters of one model."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=list(algorithm.parameters) or None,
        manufacturer=algorithm.manufacturer,
        family=coded(algorithm.family),
    )


def _finding_group(
    finding: Finding, result: PipelineResult, segmentation: Dataset
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    algorithm_id = _algorithm_id(result.algorithm_of(finding))
    measurements = [
        _measurement(VOLUME, finding.volume_mm3, CUBIC_MILLIMETER, algorithm_id),
        _measurement(LONG_AXIS, finding.longest_diameter_mm, MILLIMETER, algorithm_id),
    ]
    if result.volume.modality == "CT":
        measurements.append(
            _measurement(ATTENUATION, finding.mean_hu, HOUNSFIELD_UNIT, algorithm_id, MEAN)
        )
    category = finding.label.segment_category
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=finding.tracking_uid, identifier=finding.tracking_id
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=finding.segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(result.volume.series_instance_uid),
        ),
        finding_type=coded(finding.label.finding),
        finding_category=None if category is None else coded(category),
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


def _classification_group(
    item: Classification, algorithm: AlgorithmInfo, uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm_id = _algorithm_id(algorithm)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid, identifier=f"{item.label.name} classification"
        ),
        algorithm_id=algorithm_id,
        measurements=[_measurement(PROBABILITY, item.probability, NO_UNITS, algorithm_id)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=coded(item.label.finding), value=coded(PRESENT if item.positive else ABSENT)
            )
        ],
    )


def _absent_group(
    finding: Code, label_name: str, algorithm: AlgorithmInfo, uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid, identifier=f"{label_name}: none found"
        ),
        algorithm_id=_algorithm_id(algorithm),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coded(finding), value=coded(ABSENT))
        ],
    )


_POSITION_DESCRIPTORS = frozenset({"110901", "110902", "110903"})  # Image Position X/Y/Z


def _priority_group(
    priority: str, algorithm: AlgorithmInfo, uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 with one qualitative evaluation: (260870009, SCT, "Priority") = the triage
    priority the pipeline's rules gave the result."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier="triage priority"),
        algorithm_id=_algorithm_id(algorithm),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coded(PRIORITY), value=coded(PRIORITY_CODES[priority]))
        ],
    )


def _image_library(
    source_datasets: Sequence[Dataset], volume: Volume
) -> hd.sr.ContainerContentItem:
    """TID 1600 with one group: shared TID 1602 descriptors, one TID 1601 entry per slice.

    The descriptors of the first slice, less its position, hold for every slice:
    :func:`check_source_datasets` has checked they share size, orientation and frame of
    reference.  An enhanced multi-frame source is one entry (with the frames used, when
    not all of them are).
    """
    shared = hd.sr.ImageLibraryEntryDescriptors(classic_header(source_datasets[0]))
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    group.ContentSequence = hd.sr.ContentSequence(
        [
            item
            for item in shared
            if item.ConceptNameCodeSequence[0].CodeValue not in _POSITION_DESCRIPTORS
        ]
    )
    for ds in source_datasets:
        group.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=coded(SOURCE),
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=referenced_frames(volume, ds),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _measurement_report(
    result: PipelineResult,
    source_datasets: Sequence[Dataset],
    groups: Sequence[MeasurementGroup],
    procedures: Sequence[CodedConcept],
) -> Dataset:
    """The TID 1500 root content item, with the image library before the measurements."""
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result.algorithms),
        procedure_reported=list(procedures),
        imaging_measurements=list(groups),
    )
    root: Dataset = report[0]
    content = root.ContentSequence
    library = _image_library(source_datasets, result.volume)
    content.insert(len(content) - 1, library)  # last: measurements
    return root


def device_observer(algorithm: AlgorithmInfo) -> hd.sr.ObserverContext:
    """TID 1002 with TID 1004: one model as a device observer."""
    return hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(algorithm),
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )


def _observation_context(models: Sequence[AlgorithmInfo]) -> hd.sr.ObservationContext:
    """TID 1001 with one device observer per model, the primary (the result's) first.

    TID 1001 includes TID 1002 "Observer Context" 1-n times; highdicom takes one device,
    so the others are appended.  Which model made which group is said by each group's
    own algorithm identification (TID 4019).
    """
    primary, *others = models
    context = hd.sr.ObservationContext(observer_device_context=device_observer(primary))
    for model in others:
        context.extend(device_observer(model))
    return context


def _check_item_algorithms(result: PipelineResult) -> None:
    """The models named by segments, findings and classifications, as ``result.algorithm``."""
    named: dict[str, Sequence[SegmentResult | Finding | Classification]] = {
        "segments": result.segments,
        "findings": result.findings,
        "classifications": result.classifications,
    }
    for field, items in named.items():
        for i, item in enumerate(items):
            if item.algorithm is not None:
                check_algorithm(item.algorithm, f"result.{field}[{i}].algorithm")


def _groups(
    result: PipelineResult, segmentation: Dataset | None, uid_seed: str | None
) -> list[MeasurementGroup]:
    """One group per finding, classification and segment without findings, each with the
    algorithm identification of the model that produced it."""
    _check_item_algorithms(result)
    groups: list[MeasurementGroup] = [
        _finding_group(f, result, segmentation) for f in result.findings if segmentation
    ]
    groups.extend(
        _classification_group(
            c, result.algorithm_of(c), new_uid(uid_seed, "classification", str(i))
        )
        for i, c in enumerate(result.classifications)
    )
    with_findings = {f.segment_number for f in result.findings}
    groups.extend(
        _absent_group(
            s.label.finding,
            s.label.name,
            result.algorithm_of(s),
            new_uid(uid_seed, "absent", str(s.segment_number)),
        )
        for s in result.segments
        if s.segment_number not in with_findings
    )
    return groups


def build_measurement_report(
    result: PipelineResult,
    source_datasets: Sequence[Dataset],
    segmentation: Dataset | None,
    *,
    series_number: int = 9002,
    instance_number: int = 1,
    procedure_reported: Code | None = None,
    uid_seed: str | None = None,
    previous_versions: Sequence[Dataset] = (),
    priority: str | None = None,
    related: Sequence[Dataset] = (),
) -> Dataset:
    """Build a Comprehensive 3D SR with a TID 1500 Measurement Report for ``result``.

    Parameters
    ----------
    result
        The pipeline result: findings, classifications, the algorithm.
    source_datasets
        The source series in the volume's slice order (headers suffice), as for
        :func:`dicomnode.outputs.seg.build_segmentation`.
    segmentation
        The SEG built from the same result; findings reference its segments.  None for a
        result without segments (a classification-only pipeline).
    series_number, instance_number
        SeriesNumber and InstanceNumber of the new SR.
    procedure_reported
        The exam to report on; default: the source's ProcedureCodeSequence, else
        (25045-6, LN, "CT unspecified body region") for CT.
    uid_seed
        When given, the Series/SOP Instance UIDs and the tracking UIDs of the
        classification groups are derived from it (a retried job writes the same UIDs).
    previous_versions
        Earlier reports this one supersedes (a re-run after late instances); they are
        listed in the Predecessor Documents Sequence.
    priority
        The triage priority (``urgent``, ``review``, ``routine``) given to the result; when
        given, a last TID 1501 group carries it as a qualitative evaluation
        (:data:`PRIORITY` = one of :data:`PRIORITY_CODES`).
    related
        The other objects of the same result: heat maps (Parametric Maps) and the key
        object selection.  They are listed, with the source images and the SEG, in the
        Current Requested Procedure Evidence Sequence, as IHE AIR asks of a report for
        every object of the result.

    Raises
    ------
    OutputError
        When an argument is invalid; the message names it.  Nothing is built before all
        arguments are checked.
    """
    check_algorithm(result.algorithm)
    source_datasets = check_source_datasets(result, source_datasets)  # each instance once
    _check_patient_study(source_datasets[0])
    if segmentation is None:
        if result.segments or result.findings:
            raise OutputError("segmentation is None but the result has segments or findings")
        segment_numbers: set[int] = set()
    else:
        segment_numbers = _segment_numbers(segmentation, result)
    _check_findings(result, segment_numbers)
    _check_classifications(result.classifications)
    for i, segment in enumerate(result.segments):
        check_code(segment.label.finding, f"result.segments[{i}].label.finding")
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
            raise OutputError(f"{name} must be a positive integer, not {plain(value)!r}")
    if priority is not None and priority not in PRIORITY_CODES:
        raise OutputError(
            f"priority must be one of {', '.join(PRIORITY_CODES)}, not {plain(priority)!r}"
        )
    related = _check_related(related, result)
    groups = _groups(result, segmentation, uid_seed)
    if not groups:
        raise OutputError("result has no findings, classifications or segments: nothing to report")
    if priority is not None:
        groups.append(_priority_group(priority, result.algorithm, new_uid(uid_seed, "priority")))

    algorithm = result.algorithm
    procedures = _procedure_reported(source_datasets[0], result.volume.modality, procedure_reported)
    try:
        root = _measurement_report(result, source_datasets, groups, procedures)
        sr = hd.sr.Comprehensive3DSR(
            evidence=[
                *source_datasets,
                *([] if segmentation is None else [segmentation]),
                *related,
            ],
            content=root,
            series_instance_uid=new_uid(uid_seed, "sr", "series"),
            series_number=series_number,
            sop_instance_uid=new_uid(uid_seed, "sr", "instance"),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            performed_procedure_codes=procedures,
            series_description=series_description("measurements", algorithm),
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            coding_schemes=[IHE_CODING_SCHEME],
            previous_versions=list(previous_versions) or None,
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks; ours first
        raise OutputError(f"highdicom refused the measurement report: {exc}") from exc
    for model in result.algorithms:  # IHE AIR: each contributing algorithm
        add_algorithm_equipment(sr, model)
    logger.debug(
        "built SR %s: %d finding(s), %d classification(s)",
        sr.SOPInstanceUID,
        len(result.findings),
        len(result.classifications),
    )
    return sr
