"""SEG and SR built from an enhanced multi-frame CT: frame references against ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.errors import OutputError
from dicomnode.imaging.series import load_volume, source_datasets
from dicomnode.imaging.volume import Volume
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_measurement_report
from dicomnode.outputs.validate import run_dciodvfy, run_dsrdump
from dicomnode.pipelines.results import Classification, PipelineResult, SegmentResult
from dicomnode.synthetic.enhanced import enhanced_dataset
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom

from .cases import ALGORITHM, GEOMETRIES, LESION, finding_from_mask, require_tool

SPECS = {
    "axial": GEOMETRIES["axial"],
    "oblique-reversed": PhantomSpec(
        rows=56,
        columns=64,
        slices=24,
        pixel_spacing=(5.5, 5.0),
        slice_thickness=4.0,
        orientation="oblique",
        reverse_order=True,
        seed=6,
    ),
}


@dataclass
class EnhancedCase:
    phantom: Phantom
    path: Path
    volume: Volume
    result: PipelineResult

    @property
    def frame_mask(self) -> npt.NDArray[np.bool_]:
        """The ground truth in source frame order (frame f is phantom dataset f - 1)."""
        return self.phantom.mask


def _case(phantom: Phantom, path: Path) -> EnhancedCase:
    volume = load_volume([path])
    frames = np.asarray(volume.source_frames) - 1
    masks = [m[frames] for m in phantom.lesion_masks]
    findings = tuple(finding_from_mask(volume, m, n + 1) for n, m in enumerate(masks) if m.any())
    result = PipelineResult(
        volume=volume,
        segments=(SegmentResult(1, LESION, phantom.mask[frames]),),
        findings=findings,
        classifications=(Classification(LESION, 0.9731, positive=True),),
        algorithm=ALGORITHM,
    )
    return EnhancedCase(phantom, path, volume, result)


def _enhanced(tmp_path: Path, spec: PhantomSpec, phases: int = 1) -> EnhancedCase:
    phantom = generate_phantom(spec)
    first = phantom.datasets[0]
    later = [
        generate_phantom(
            PhantomSpec(
                **{
                    **spec.__dict__,
                    "seed": spec.seed + i,
                    "study_instance_uid": first.StudyInstanceUID,
                    "frame_of_reference_uid": first.FrameOfReferenceUID,
                }
            )
        )
        for i in range(1, phases)
    ]
    path = tmp_path / "enhanced.dcm"
    enhanced_dataset(phantom, later_phases=later).save_as(path, enforce_file_format=True)
    return _case(phantom, path)


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _assert_dciodvfy_clean(path: Path) -> None:
    require_tool("dciodvfy")
    report = run_dciodvfy(path)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output


def _source_item(frame: Dataset) -> Any:
    (derivation,) = frame.DerivationImageSequence
    (source,) = derivation.SourceImageSequence  # exactly one source frame per SEG frame
    return source


@pytest.mark.parametrize("geometry", sorted(SPECS))
def test_seg_of_an_enhanced_ct_references_the_right_frames(geometry: str, tmp_path: Path) -> None:
    # Given an Enhanced CT phantom, its volume and the ground-truth mask in slice order
    case = _enhanced(tmp_path, SPECS[geometry])
    uid = case.volume.sop_instance_uids[0]

    # When the SEG is built from the instance's header, written and read back
    path = _write(build_segmentation(case.result, source_datasets(case.volume)), tmp_path / "s")
    seg = hd.seg.segread(path)

    # Then each SEG frame references one source frame, lies at its position and holds the
    # ground truth of that frame
    source = pydicom.dcmread(case.path, stop_before_pixels=True)
    assert seg.NumberOfFrames == case.volume.shape[0]
    pixels = seg.pixel_array.astype(bool)
    referenced = []
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        item = _source_item(frame)
        assert item.ReferencedSOPInstanceUID == uid
        number = int(item.ReferencedFrameNumber)
        referenced.append(number)
        source_frame = source.PerFrameFunctionalGroupsSequence[number - 1]
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source_frame.PlanePositionSequence[0].ImagePositionPatient],
            atol=1e-3,
        )
        np.testing.assert_array_equal(pixels[index], case.frame_mask[number - 1])
    assert sorted(referenced) == list(range(1, case.volume.shape[0] + 1))
    assert case.frame_mask.any()
    # And highdicom's own reader maps source frames to the same masks
    by_frame = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=uid,
        source_frame_numbers=list(range(1, case.volume.shape[0] + 1)),
        segment_numbers=[1],
    )
    np.testing.assert_array_equal(by_frame[..., 0].astype(bool), case.frame_mask)
    (series,) = seg.ReferencedSeriesSequence
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [uid]
    _assert_dciodvfy_clean(path)
    _assert_dciodvfy_clean(case.path)  # the phantom itself


def test_one_header_per_slice_gives_the_same_seg(tmp_path: Path) -> None:
    # Given the sources as the app reads them today: one header per slice (all the same)
    case = _enhanced(tmp_path, SPECS["axial"])
    per_slice = [pydicom.dcmread(p, stop_before_pixels=True) for p in case.volume.source_paths]

    seg = build_segmentation(case.result, per_slice, uid_seed="x")

    once = build_segmentation(case.result, source_datasets(case.volume), uid_seed="x")
    assert seg.PixelData == once.PixelData
    assert seg.PerFrameFunctionalGroupsSequence == once.PerFrameFunctionalGroupsSequence


def test_seg_of_one_phase_references_only_that_phase(tmp_path: Path) -> None:
    # Given an Enhanced CT with two phases at the same positions; the volume is phase 1
    case = _enhanced(tmp_path, SPECS["axial"], phases=2)
    n = case.volume.shape[0]
    assert sorted(case.volume.source_frames) == list(range(1, n + 1))

    path = _write(build_segmentation(case.result, source_datasets(case.volume)), tmp_path / "s")
    seg = hd.seg.segread(path)

    # Then every SEG frame references its phase-1 frame only (not the phase-2 frame there)
    pixels = seg.pixel_array.astype(bool)
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(_source_item(frame).ReferencedFrameNumber)
        assert 1 <= number <= n
        np.testing.assert_array_equal(pixels[index], case.frame_mask[number - 1])
    _assert_dciodvfy_clean(path)


@pytest.mark.parametrize("phases", [1, 2])
def test_sr_of_an_enhanced_ct_lists_the_instance_once(phases: int, tmp_path: Path) -> None:
    # Given an Enhanced CT (one or two phases) and its SEG
    case = _enhanced(tmp_path, SPECS["oblique-reversed"], phases=phases)
    sources = source_datasets(case.volume)
    seg = build_segmentation(case.result, sources)

    # When the SR is built, written and read back
    path = _write(build_measurement_report(case.result, sources, seg), tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)

    # Then the image library has one entry for the instance, naming the frames when the
    # volume is some of them, and the evidence lists the instance and the SEG
    library = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"
    )
    (group,) = library.ContentSequence
    images = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
    assert len(images) == 1
    (reference,) = images[0].ReferencedSOPSequence
    assert reference.ReferencedSOPInstanceUID == case.volume.sop_instance_uids[0]
    if phases == 1:
        assert "ReferencedFrameNumber" not in reference
    else:
        assert [int(f) for f in reference.ReferencedFrameNumber] == list(range(1, 25))
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {case.volume.sop_instance_uids[0], seg.SOPInstanceUID}
    require_tool("dciodvfy")
    report = run_dciodvfy(path)
    assert report.errors == [], report.output
    require_tool("dsrdump")
    assert run_dsrdump(path).errors == []


def test_sources_that_are_not_the_volumes_instance_are_refused(tmp_path: Path) -> None:
    case = _enhanced(tmp_path, SPECS["axial"])
    other = enhanced_dataset(case.phantom)  # same pixels and geometry, another instance

    with pytest.raises(OutputError, match="source_datasets are the instance"):
        build_segmentation(case.result, [other])
