"""build_measurement_report: TID 1500 content, references, validators, invalid inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.errors import OutputError
from dicomnode.inference.card import Code
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_measurement_report
from dicomnode.outputs.validate import run_dciodvfy, run_dsrdump
from dicomnode.pipelines.results import Classification, PipelineResult

from .cases import LESION, Case, require_tool

CaseFactory = Callable[[str], Case]
VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")
LONG_AXIS = hd.sr.CodedConcept("103339001", "SCT", "Long axis")
ATTENUATION = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
LESION_FINDING = hd.sr.CodedConcept("52988006", "SCT", "Lesion")


def build_pair(
    case: Case, tmp_path: Path, result: PipelineResult | None = None, **kwargs: Any
) -> tuple[Dataset, Path, Any]:
    """Build the SEG and the SR, write the SR and read it back; return (seg, path, sr)."""
    result = case.result if result is None else result
    seg = build_segmentation(result, case.source)
    sr = build_measurement_report(result, case.source, seg, **kwargs)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    return seg, path, hd.sr.srread(path)


def assert_validators_clean(path: Path) -> None:
    require_tool("dciodvfy")
    require_tool("dsrdump")
    iod = run_dciodvfy(path)
    assert iod.errors == [], iod.output
    assert iod.warnings == [], iod.output
    tree = run_dsrdump(path)
    assert tree.errors == [], tree.output
    assert tree.warnings == []


def root_items(sr: Any, code_value: str) -> list[Dataset]:
    """Items under the TID 1500 root whose concept name has this code value."""
    return [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value]


def report_of(sr: Any) -> hd.sr.MeasurementReport:
    return hd.sr.MeasurementReport.from_sequence(sr.content)


def test_report_has_one_group_per_finding_referencing_the_seg(
    case_factory: CaseFactory, tmp_path: Path
) -> None:
    # Given a phantom with three lesions measured from the ground truth
    case = case_factory("coronal-reversed-nonsquare")
    assert len(case.result.findings) == 3

    # When the SEG and the SR are built
    seg, path, sr = build_pair(case, tmp_path)

    # Then the SR is a Comprehensive 3D SR with a TID 1500 root
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert sr.SeriesDescription.endswith("not for diagnostic use")
    assert len(sr.SeriesDescription) <= 64
    assert sr.StudyInstanceUID == case.volume.study_instance_uid

    # And each finding has its own TID 1411 group with tracking id/uid, segment, measurements
    report = report_of(sr)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(case.result.findings)
    for finding in case.result.findings:
        (group,) = report.get_volumetric_roi_measurement_groups(tracking_uid=finding.tracking_uid)
        assert group.tracking_identifier == finding.tracking_id
        assert group.finding_type == hd.sr.CodedConcept("52988006", "SCT", "Lesion")
        segment_item = group.referenced_segment[0]
        reference = segment_item.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == seg.SOPClassUID
        assert reference.ReferencedSegmentNumber == finding.segment_number
        (volume,) = group.get_measurements(name=VOLUME)
        assert volume.value == pytest.approx(finding.volume_mm3, rel=1e-9)
        assert volume.unit == hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")
        (long_axis,) = group.get_measurements(name=LONG_AXIS)
        assert long_axis.value == pytest.approx(finding.longest_diameter_mm, rel=1e-9)
        (mean,) = group.get_measurements(name=ATTENUATION)
        assert mean.value == pytest.approx(finding.mean_hu, rel=1e-9)
        assert mean.derivation == hd.sr.CodedConcept("373098007", "SCT", "Mean")
        assert mean.unit.value == "[hnsf'U]"
    assert_validators_clean(path)


def test_report_context_evidence_and_equipment(case_factory: CaseFactory, tmp_path: Path) -> None:
    case = case_factory("axial")
    seg, _, sr = build_pair(case, tmp_path, series_number=88, instance_number=2)

    assert (sr.SeriesNumber, sr.InstanceNumber) == (88, 2)
    report = report_of(sr)
    (device,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = device.observer_identifying_attributes
    assert attributes.name == "lesion-seg"
    procedures = root_items(sr, "121058")
    assert [p.ConceptCodeSequence[0].CodeValue for p in procedures] == ["25045-6"]
    purposes = {
        (p.CodeValue, p.CodingSchemeDesignator, p.CodeMeaning): item
        for item in sr.ContributingEquipmentSequence
        for p in item.PurposeOfReferenceCodeSequence
    }
    algorithm = purposes[("1630", "99IHE", "Processing Algorithm")]
    assert algorithm.ManufacturerModelName == "lesion-seg"
    assert "1.0.0" in algorithm.SoftwareVersions
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == {*case.volume.sop_instance_uids, seg.SOPInstanceUID}
    library = root_items(sr, "111028")
    entries = [i for i in library[0].ContentSequence[0].ContentSequence if i.ValueType == "IMAGE"]
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == list(
        case.volume.sop_instance_uids
    )


def test_classification_is_reported_with_its_probability(
    case_factory: CaseFactory, tmp_path: Path
) -> None:
    case = case_factory("axial")
    _, _, sr = build_pair(case, tmp_path)

    (group,) = report_of(sr).get_image_measurement_groups()
    assert group.tracking_identifier == "Lesion classification"
    (probability,) = group.get_measurements(name=PROBABILITY)
    assert probability.value == pytest.approx(0.9731)
    (evaluation,) = group.get_qualitative_evaluations(name=LESION_FINDING)
    assert evaluation.name == hd.sr.CodedConcept("52988006", "SCT", "Lesion")
    assert evaluation.value == hd.sr.CodedConcept("52101004", "SCT", "Present")


def test_no_findings_still_gives_a_valid_report(case_factory: CaseFactory, tmp_path: Path) -> None:
    # Given a result with nothing found and a negative classification
    case = case_factory("axial-reversed")
    result = replace(
        case.result,
        findings=(),
        classifications=(Classification(LESION, 0.0123, positive=False),),
    )

    _, path, sr = build_pair(case, tmp_path, result=result)

    report = report_of(sr)
    assert report.get_volumetric_roi_measurement_groups() == []
    groups = report.get_image_measurement_groups()
    identifiers = sorted(g.tracking_identifier for g in groups)
    assert identifiers == ["Lesion classification", "Lesion: none found"]
    for group in groups:
        (evaluation,) = group.get_qualitative_evaluations(name=LESION_FINDING)
        assert evaluation.value == hd.sr.CodedConcept("272519000", "SCT", "Absent")
    assert_validators_clean(path)


def test_procedure_code_of_the_source_is_reported(
    case_factory: CaseFactory, tmp_path: Path
) -> None:
    case = case_factory("oblique-nonsquare")
    source = list(case.source)
    first = copy.deepcopy(source[0])
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "24627-2", "LN", "CT Chest"
    first.ProcedureCodeSequence = [item]
    source[0] = first
    seg = build_segmentation(case.result, source)

    sr = build_measurement_report(case.result, source, seg)

    procedures = root_items(sr, "121058")
    assert [p.ConceptCodeSequence[0].CodeValue for p in procedures] == ["24627-2"]


def test_decimal_strings_fit_dicom(case_factory: CaseFactory, tmp_path: Path) -> None:
    # Values with many digits must still be written as DS of at most 16 characters.
    case = case_factory("axial")
    finding = replace(
        case.result.findings[0], volume_mm3=1234.5678901234567, longest_diameter_mm=1 / 3
    )
    result = replace(case.result, findings=(finding,))
    _, path, sr = build_pair(case, tmp_path, result=result)

    (group,) = report_of(sr).get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements(name=VOLUME)
    written = volume[0].MeasuredValueSequence[0].NumericValue
    assert len(written.original_string or str(written)) <= 16
    assert volume.value == pytest.approx(1234.5678901234567, rel=1e-6)
    require_tool("dciodvfy")
    assert run_dciodvfy(path).errors == []


def _finding(case: Case, **changes: Any) -> PipelineResult:
    return replace(case.result, findings=(replace(case.result.findings[0], **changes),))


INVALID: dict[str, tuple[Callable[[Case, Dataset], tuple[PipelineResult, Any, Any]], str]] = {
    "segment number": (
        lambda c, s: (_finding(c, segment_number=5), c.source, s),
        r"result.findings\[0\].segment_number",
    ),
    "tracking uid": (
        lambda c, s: (_finding(c, tracking_uid="not a uid"), c.source, s),
        r"result.findings\[0\].tracking_uid",
    ),
    "duplicate tracking uid": (
        lambda c, s: (
            replace(c.result, findings=(c.result.findings[0], c.result.findings[0])),
            c.source,
            s,
        ),
        r"result.findings\[1\].tracking_uid",
    ),
    "volume": (
        lambda c, s: (_finding(c, volume_mm3=float("nan")), c.source, s),
        r"result.findings\[0\].volume_mm3",
    ),
    "probability": (
        lambda c, s: (
            replace(c.result, classifications=(Classification(LESION, 1.5, True),)),
            c.source,
            s,
        ),
        r"result.classifications\[0\].probability",
    ),
    "segmentation class": (lambda c, s: (c.result, c.source, c.source[0]), "segmentation"),
    "source order": (lambda c, s: (c.result, c.source[::-1], s), r"source_datasets\[0\]"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_input_raises_output_error_naming_it(name: str, case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    seg = build_segmentation(case.result, case.source)
    make, pattern = INVALID[name]
    result, source, segmentation = make(case, seg)
    with pytest.raises(OutputError, match=pattern):
        build_measurement_report(result, source, segmentation)


def test_invalid_procedure_code(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    seg = build_segmentation(case.result, case.source)
    with pytest.raises(OutputError, match="procedure_reported"):
        build_measurement_report(
            case.result, case.source, seg, procedure_reported=Code("", "LN", "x")
        )


def test_uid_seed_gives_the_same_report_uids(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    seg = build_segmentation(case.result, case.source, uid_seed="job-7")
    first, again = (
        build_measurement_report(case.result, case.source, seg, uid_seed="job-7") for _ in range(2)
    )
    assert first.SOPInstanceUID == again.SOPInstanceUID != seg.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    groups = [report_of(sr).get_image_measurement_groups()[0] for sr in (first, again)]
    assert groups[0].tracking_uid == groups[1].tracking_uid
