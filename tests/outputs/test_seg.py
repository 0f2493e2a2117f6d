"""build_segmentation: geometry against ground truth, header, validators, invalid inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.errors import OutputError
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.validate import run_dciodvfy
from dicomnode.pipelines.results import PipelineResult, SegmentResult

from .cases import ALGORITHM, GEOMETRIES, LESION, NODULE, Case, require_tool

CaseFactory = Callable[[str], Case]


def write_and_read(seg: Dataset, tmp_path: Path, name: str = "seg.dcm") -> tuple[Path, Any]:
    path = tmp_path / name
    seg.save_as(path, enforce_file_format=True)
    return path, hd.seg.segread(path)


def assert_dciodvfy_clean(path: Path) -> None:
    require_tool("dciodvfy")
    report = run_dciodvfy(path)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_seg_matches_the_mask_voxel_for_voxel(
    geometry: str, case_factory: CaseFactory, tmp_path: Path
) -> None:
    # Given a phantom in this geometry and its ground-truth mask in the volume's slice order
    case = case_factory(geometry)

    # When the SEG is built, written and read back
    path, seg = write_and_read(build_segmentation(case.result, case.source), tmp_path)

    # Then every source slice has its frame and the frames equal the mask by source UID
    assert seg.NumberOfFrames == case.volume.shape[0]  # empty frames kept (OHIF)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(case.volume.sop_instance_uids), segment_numbers=[1]
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), case.mask)

    # And, independently of the references, the SEG's own geometry puts each segmented
    # voxel on the patient position of the ground-truth voxel
    seg_volume = seg.get_volume(segment_numbers=[1], combine_segments=True)
    seg_points = seg_volume.map_indices_to_reference(np.argwhere(seg_volume.array > 0))
    truth_points = case.volume.voxel_to_patient(np.argwhere(case.mask))
    assert len(seg_points) == len(truth_points) > 0
    order = np.lexsort(np.round(seg_points, 2).T)
    truth_order = np.lexsort(np.round(truth_points, 2).T)
    np.testing.assert_allclose(seg_points[order], truth_points[truth_order], atol=1e-3)

    # And each frame's source reference is the image at the frame's position (OHIF)
    position_of = {
        ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in case.source
    }
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        frame_position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(
            frame_position, position_of[source.ReferencedSOPInstanceUID], atol=1e-3
        )
    assert_dciodvfy_clean(path)


def test_seg_header_describes_the_algorithm_and_the_source(
    case_factory: CaseFactory, tmp_path: Path
) -> None:
    case = case_factory("axial")
    _, seg = write_and_read(
        build_segmentation(case.result, case.source, series_number=77, instance_number=3),
        tmp_path,
    )

    assert (seg.SeriesNumber, seg.InstanceNumber) == (77, 3)
    assert seg.SegmentationType == "BINARY"
    assert seg.Manufacturer == "dicomnode"
    description = seg.SeriesDescription
    assert len(description) <= 64
    assert description.startswith("AI ") and description.endswith("not for diagnostic use")
    assert "lesion-seg 1.0.0" in description
    assert seg.StudyInstanceUID == case.volume.study_instance_uid
    assert seg.FrameOfReferenceUID == case.volume.frame_of_reference_uid
    assert seg.SeriesInstanceUID != case.volume.series_instance_uid

    (segment,) = seg.SegmentSequence
    assert segment.SegmentNumber == 1
    assert segment.SegmentLabel == "Lesion"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    seg_type = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (seg_type.CodeValue, seg_type.CodingSchemeDesignator) == ("52988006", "SCT")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("lesion-seg", "1.0.0")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"

    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == case.volume.series_instance_uid
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == set(
        case.volume.sop_instance_uids
    )
    purposes = {
        (p.CodeValue, p.CodingSchemeDesignator)
        for item in seg.ContributingEquipmentSequence
        for p in item.PurposeOfReferenceCodeSequence
    }
    assert ("1630", "99IHE") in purposes


def test_seg_with_two_overlapping_segments(case_factory: CaseFactory, tmp_path: Path) -> None:
    # Given segment 2 = one lesion, which also lies inside segment 1 (all lesions)
    case = case_factory("coronal-reversed-nonsquare")
    second = case.masks[0]
    result = replace(
        case.result,
        segments=(*case.result.segments, SegmentResult(2, NODULE, second)),
    )

    path, seg = write_and_read(build_segmentation(result, case.source), tmp_path)

    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lesion", "Nodule"]
    assert seg.NumberOfFrames == 2 * case.volume.shape[0]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(case.volume.sop_instance_uids), segment_numbers=[1, 2]
    ).astype(bool)
    np.testing.assert_array_equal(pixels[..., 0], case.mask)
    np.testing.assert_array_equal(pixels[..., 1], second)
    assert_dciodvfy_clean(path)


def test_all_empty_mask_gives_a_valid_seg(case_factory: CaseFactory, tmp_path: Path) -> None:
    case = case_factory("axial")
    empty = np.zeros(case.volume.shape, dtype=bool)
    result = replace(case.result, segments=(SegmentResult(1, LESION, empty),), findings=())

    path, seg = write_and_read(build_segmentation(result, case.source), tmp_path)

    assert len(seg.SegmentSequence) == 1
    assert seg.NumberOfFrames == case.volume.shape[0]
    pixels = seg.get_pixels_by_source_instance(list(case.volume.sop_instance_uids))
    assert not pixels.any()
    assert_dciodvfy_clean(path)


def _with_segment(case: Case, **changes: Any) -> PipelineResult:
    return replace(case.result, segments=(replace(case.result.segments[0], **changes),))


INVALID: dict[str, tuple[Callable[[Case], tuple[PipelineResult, list[Dataset]]], str]] = {
    "no segments": (lambda c: (replace(c.result, segments=()), c.source), "result.segments"),
    "mask shape": (
        lambda c: (_with_segment(c, mask=c.mask[:-1]), c.source),
        "result.segments[0].mask",
    ),
    "mask dtype": (
        lambda c: (_with_segment(c, mask=c.mask.astype(np.uint8)), c.source),
        "result.segments[0].mask",
    ),
    "segment number": (
        lambda c: (_with_segment(c, segment_number=2), c.source),
        "result.segments[0].segment_number",
    ),
    "segment type": (
        lambda c: (_with_segment(c, label=replace(LESION, segment_type=None)), c.source),
        "result.segments[0].label.segment_type",
    ),
    "algorithm": (
        lambda c: (replace(c.result, algorithm=replace(ALGORITHM, name="")), c.source),
        "result.algorithm.name",
    ),
    "source order": (lambda c: (c.result, c.source[::-1]), "source_datasets[0]"),
    "source count": (lambda c: (c.result, c.source[1:]), "source_datasets"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_input_raises_output_error_naming_it(name: str, case_factory: CaseFactory) -> None:
    make, argument = INVALID[name]
    result, source = make(case_factory("axial-reversed"))
    with pytest.raises(OutputError, match=argument.replace("[", r"\[").replace("]", r"\]")):
        build_segmentation(result, source)


def test_invalid_series_number(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    with pytest.raises(OutputError, match="series_number"):
        build_segmentation(case.result, case.source, series_number=0)


def test_source_with_moved_slice_is_refused(case_factory: CaseFactory) -> None:
    # A dataset with the right UID but the next slice's position would misplace the mask.
    case = case_factory("axial")
    moved = list(case.source)
    moved[3] = copy.deepcopy(moved[3])
    moved[3].ImagePositionPatient = case.source[4].ImagePositionPatient
    with pytest.raises(OutputError, match=r"source_datasets\[3\].ImagePositionPatient"):
        build_segmentation(case.result, moved)


def test_headers_without_pixel_data_suffice(case_factory: CaseFactory) -> None:
    # The node may pass headers read with stop_before_pixels: the SEG needs no pixels.
    case = case_factory("axial")
    headers = []
    for ds in case.source:
        header = Dataset({tag: element for tag, element in ds.items() if tag != 0x7FE00010})
        header.file_meta = ds.file_meta
        headers.append(header)

    seg = build_segmentation(case.result, headers)

    assert seg.NumberOfFrames == case.volume.shape[0]


def test_uid_seed_gives_the_same_uids(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    first = build_segmentation(case.result, case.source, uid_seed="job-1")
    again = build_segmentation(case.result, case.source, uid_seed="job-1")
    other = build_segmentation(case.result, case.source, uid_seed="job-2")
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.SOPInstanceUID != first.SeriesInstanceUID
