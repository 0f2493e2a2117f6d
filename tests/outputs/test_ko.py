"""build_key_object_selection: key images of findings; the SR lists the KOS and heat map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.errors import OutputError
from dicomnode.imaging.series import source_datasets
from dicomnode.outputs.ko import build_key_object_selection
from dicomnode.outputs.pm import build_parametric_map
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_measurement_report
from dicomnode.outputs.validate import run_dciodvfy, run_dsrdump

from .cases import GEOMETRIES, Case, require_tool
from .test_enhanced import SPECS, _enhanced
from .test_pm import with_heat_map

CaseFactory = Callable[[str], Case]


def assert_clean(path: Path) -> None:
    require_tool("dciodvfy")
    report = run_dciodvfy(path)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output


def image_items(kos: Dataset) -> list[tuple[str, list[int]]]:
    out = []
    for item in kos.ContentSequence:
        if item.ValueType == "IMAGE":
            (ref,) = item.ReferencedSOPSequence
            frames = ref.get("ReferencedFrameNumber")
            numbers = [] if frames is None else [int(f) for f in np.atleast_1d(frames)]
            out.append((str(ref.ReferencedSOPInstanceUID), numbers))
    return out


def description(kos: Dataset) -> str:
    (text,) = [
        i.TextValue
        for i in kos.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    return str(text)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_kos_points_at_the_largest_cross_section_of_each_finding(
    geometry: str, case_factory: CaseFactory, tmp_path: Path
) -> None:
    # Given a result whose findings know their ground-truth masks
    case = case_factory(geometry)
    expected = {}
    findings = []
    for finding, mask in zip(case.result.findings, [m for m in case.masks if m.any()], strict=True):
        k = int(np.argmax(mask.reshape(len(mask), -1).sum(axis=1)))
        findings.append(replace(finding, key_slice=k))
        expected[finding.tracking_id] = case.volume.sop_instance_uids[k]
    result = replace(case.result, findings=tuple(findings))
    # When the key object selection is built, written and read back
    kos = build_key_object_selection(result, case.source, uid_seed="kos")
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    # Then it points at each finding's largest cross-section, naming its tracking id
    referenced = {uid for uid, _ in image_items(back)}
    assert referenced == set(expected.values())
    text = description(back)
    for finding in findings:
        uid = expected[finding.tracking_id]
        number = next(ds.InstanceNumber for ds in case.source if ds.SOPInstanceUID == uid)
        line = next(x for x in text.splitlines() if x.startswith(f"{finding.tracking_id}:"))
        assert f"image {number} " in line and finding.tracking_uid in line
    assert back.ConceptNameCodeSequence[0].CodeValue == "113000"
    assert back.StudyInstanceUID == case.volume.study_instance_uid
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in back.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert evidence == referenced
    assert_clean(path)
    require_tool("dsrdump")
    assert run_dsrdump(path).errors == []


def test_kos_of_an_enhanced_ct_names_the_key_frames(tmp_path: Path) -> None:
    case = _enhanced(tmp_path, SPECS["oblique-reversed"])
    kos = build_key_object_selection(case.result, source_datasets(case.volume), uid_seed="e")
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    ((uid, frames),) = image_items(pydicom.dcmread(path))
    wanted = sorted({case.volume.frame_number(f.key_slice_index) for f in case.result.findings})
    assert uid == case.volume.sop_instance_uids[0]
    assert frames == wanted
    assert_clean(path)


def test_a_result_without_findings_has_no_key_images(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    with pytest.raises(OutputError, match="needs a finding"):
        build_key_object_selection(replace(case.result, findings=()), case.source)


def test_key_slice_outside_the_volume_is_refused(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    bad = replace(case.result.findings[0], key_slice=case.volume.shape[0])
    result = replace(case.result, findings=(bad, *case.result.findings[1:]))
    with pytest.raises(OutputError, match=r"findings\[0\]\.key_slice"):
        build_key_object_selection(result, case.source)


def test_sr_lists_the_heat_map_and_key_images_as_evidence(
    case_factory: CaseFactory, tmp_path: Path
) -> None:
    # Given the SEG, heat map and key images of one result
    case = case_factory("axial")
    result = with_heat_map(case.result)
    seg = build_segmentation(result, case.source, uid_seed="ev")
    pm = build_parametric_map(result, case.source, uid_seed="ev")
    kos = build_key_object_selection(result, case.source, uid_seed="ev")
    # When the report is built with them
    sr = build_measurement_report(result, case.source, seg, uid_seed="ev", related=[pm, kos])
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    # Then its evidence names each, with its SOP class, in the result's study
    listed = {
        str(i.ReferencedSOPInstanceUID): str(i.ReferencedSOPClassUID)
        for s in back.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    for ds in (seg, pm, kos):
        assert listed[ds.SOPInstanceUID] == ds.SOPClassUID
    assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)
    assert_clean(path)


def test_related_object_of_another_study_is_refused(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    other = Dataset()
    other.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"
    other.SOPInstanceUID = generate_uid()
    other.StudyInstanceUID = generate_uid()
    seg = build_segmentation(case.result, case.source)
    with pytest.raises(OutputError, match=r"related\[0\]\.StudyInstanceUID"):
        build_measurement_report(case.result, case.source, seg, related=[other])
