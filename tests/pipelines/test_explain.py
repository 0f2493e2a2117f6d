"""Heat maps and key images through the node: the lesion pipeline with the shipped models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.app.processor import Processor
from dicomnode.config import Config, PipelineSettings, builtin_bundle
from dicomnode.errors import ConfigError
from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label, load_bundle
from dicomnode.outputs.layout import result_files
from dicomnode.outputs.validate import run_dciodvfy, run_dsrdump
from dicomnode.pipelines.classification import EXPLAINED_SLICES
from dicomnode.pipelines.lesion import measure_components
from dicomnode.pipelines.registry import check_pipeline
from dicomnode.synthetic.phantom import Lesion, PhantomSpec, generate_phantom, write_phantom

LABEL = Label(0, "lesion", 0.5, finding=Code("52988006", "SCT", "Lesion"))
#: dciodvfy's warnings on every Parametric Map (see tests/outputs/test_pm.py).
PM_WARNINGS = ("<QUANTITY>", "attribute <Laterality>")


def lesion_settings(heat_maps: bool, key_images: bool = True) -> PipelineSettings:
    return PipelineSettings(
        "lesion",
        {
            "segmentation": builtin_bundle("lesion-seg"),
            "classification": builtin_bundle("lesion-cls"),
        },
        providers=("cpu",),
        heat_maps=heat_maps,
        key_images=key_images,
    )


def flat_volume(shape: tuple[int, int, int]) -> Volume:
    return Volume(
        pixels=np.zeros(shape, dtype=np.int16),
        origin=(0.0, 0.0, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        slice_direction=(0.0, 0.0, 1.0),
        pixel_spacing=(1.0, 1.0),
        slice_spacing=1.0,
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        frame_of_reference_uid="1.2.4",
        modality="CT",
        sop_instance_uids=tuple(f"1.2.5.{i}" for i in range(shape[0])),
    )


def test_key_slice_is_where_the_cross_section_is_largest() -> None:
    # Given two cones pointing opposite ways: areas 1, 9, 25, 49 and 49, 25, 9, 1 pixels
    mask = np.zeros((12, 40, 40), dtype=bool)
    for i, half in enumerate((0, 1, 2, 3)):
        mask[1 + i, 5 - half : 6 + half, 5 - half : 6 + half] = True
        mask[7 + i, 30 - (3 - half) : 31 + (3 - half), 30 - (3 - half) : 31 + (3 - half)] = True
    # When the components are measured
    _, findings = measure_components(
        flat_volume(mask.shape), mask, LABEL, 1, min_volume_mm3=0.0, uid_seed="cones"
    )
    # Then each finding's key slice is its widest slice
    assert sorted(f.key_slice for f in findings) == [4, 7]
    for f in findings:
        assert f.key_slice in f.slice_indices


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    tmp = tmp_path_factory.mktemp("explain")
    phantom = generate_phantom(PhantomSpec(slices=40, seed=21))
    files = write_phantom(phantom, tmp / "in")
    series = str(phantom.datasets[0].SeriesInstanceUID)
    processor = Processor(Config(pipelines=(lesion_settings(True),)))
    out = processor.process_series(
        files, "lesion", result_files(tmp / "out", series, "lesion"), uid_seed="explain"
    )
    return phantom, out, tmp


def test_heat_map_is_the_segmentation_probability_over_the_source(
    explained: tuple[object, object, Path], require_tool: Callable[[str], str]
) -> None:
    # Given the lesion pipeline with heat_maps = true has processed a phantom with lesions
    phantom, out, _ = explained
    assert out.heat_maps and out.segmentation is not None and out.key_images is not None  # type: ignore[attr-defined]
    # Then the files are sent SEG, heat map, key images, SR (what the SR lists goes first)
    assert out.files == [out.segmentation, out.heat_maps[0], out.key_images, out.report]  # type: ignore[attr-defined]
    pm = pydicom.dcmread(out.heat_maps[0])  # type: ignore[attr-defined]
    seg = hd.seg.segread(out.segmentation)  # type: ignore[attr-defined]
    # And the map, slice by slice, is at least 0.5 wherever the SEG marks a lesion ...
    uids = [str(ds.SOPInstanceUID) for ds in phantom.datasets]  # type: ignore[attr-defined]
    levels = np.zeros((len(uids), *pm.pixel_array.shape[1:]), dtype=np.int32)
    for i, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        levels[uids.index(str(source.ReferencedSOPInstanceUID))] = pm.pixel_array[i]
    marked = np.zeros_like(levels, dtype=bool)
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        marked[uids.index(str(source.ReferencedSOPInstanceUID))] |= seg.pixel_array[i] > 0
    assert marked.any()
    threshold = load_bundle(builtin_bundle("lesion-seg")).card.labels[0].threshold
    assert levels[marked].min() >= int(threshold * 255)  # lesion-seg 1.1.x: 0.4 = level 102
    # ... its hottest voxel lies in a lesion of the ground truth, and away from them it is cold
    truth = phantom.mask  # type: ignore[attr-defined]
    assert truth.reshape(-1)[int(np.argmax(levels))]
    assert levels[~truth].mean() < 0.05 * 255
    # And the SR lists the heat map and the key images; every object is valid
    sr = pydicom.dcmread(out.report)  # type: ignore[attr-defined]
    listed = {
        str(i.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    kos = pydicom.dcmread(out.key_images)  # type: ignore[attr-defined]
    assert {pm.SOPInstanceUID, kos.SOPInstanceUID} <= listed
    require_tool("dciodvfy")
    for path in out.files:  # type: ignore[attr-defined]
        report = run_dciodvfy(path)
        assert report.errors == [], report.output
        assert [w for w in report.warnings if not any(k in w for k in PM_WARNINGS)] == []
    require_tool("dsrdump")
    assert run_dsrdump(out.key_images).errors == []  # type: ignore[attr-defined]


def test_key_images_are_the_findings_widest_slices(
    explained: tuple[object, object, Path],
) -> None:
    # Given the same run: each finding's key image is where its lesion is (nearly) widest
    phantom, out, _ = explained
    uids = [str(ds.SOPInstanceUID) for ds in phantom.datasets]  # type: ignore[attr-defined]
    kos = pydicom.dcmread(out.key_images)  # type: ignore[attr-defined]
    referenced = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if item.ValueType == "IMAGE"
    }
    summary = out.summary["key_images"]  # type: ignore[attr-defined]
    assert len(summary) == len(phantom.lesions)  # type: ignore[attr-defined]
    assert {k["sop_instance_uid"] for k in summary} == referenced
    centroids = {f["tracking_id"]: f["centroid_mm"] for f in out.summary["findings"]}  # type: ignore[attr-defined]
    for key in summary:
        # the lesion of the ground truth nearest to the finding's centroid
        centre = np.asarray(centroids[key["tracking_id"]])
        distances = [
            np.linalg.norm(np.asarray(lesion.center_mm) - centre)
            for lesion in phantom.lesions  # type: ignore[attr-defined]
        ]
        own = phantom.lesion_masks[int(np.argmin(distances))]  # type: ignore[attr-defined]
        areas = own.reshape(len(own), -1).sum(axis=1)
        k = uids.index(key["sop_instance_uid"])
        # a sphere is nearly as wide on the slices next to its centre: the model's widest
        # slice is one of the widest of the ground truth
        assert areas[k] >= 0.85 * areas.max(), (key, areas.tolist())


def test_without_the_settings_there_is_no_heat_map_and_no_key_images(tmp_path: Path) -> None:
    phantom = generate_phantom(PhantomSpec(slices=24, seed=22))
    files = write_phantom(phantom, tmp_path / "in")
    series = str(phantom.datasets[0].SeriesInstanceUID)
    processor = Processor(Config(pipelines=(lesion_settings(False, key_images=False),)))
    out = processor.process_series(
        files, "lesion", result_files(tmp_path / "out", series, "lesion"), uid_seed="plain"
    )
    assert out.heat_maps == () and out.key_images is None
    assert out.summary["findings"]  # there was something to point at
    assert out.files == [out.segmentation, out.report]
    assert not result_files(tmp_path / "out", series, "lesion").heat_map.exists()
    assert not result_files(tmp_path / "out", series, "lesion").key_images.exists()
    assert out.summary["heat_maps"] == []


def test_a_kind_that_makes_no_heat_maps_is_refused_before_any_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicomnode.pipelines.classification import ClassificationKind

    monkeypatch.setattr(ClassificationKind, "explains", False)
    settings = PipelineSettings(
        "triage",
        {"classification": builtin_bundle("lesion-cls")},
        kind="classification",
        heat_maps=True,
    )
    with pytest.raises(ConfigError, match="heat_maps = true, but kind 'classification'"):
        check_pipeline(settings)


def test_a_classification_is_explained_by_occlusion_where_the_lesion_is(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    # Given a classification-only pipeline with heat maps and a study with one lesion
    settings = PipelineSettings(
        "triage",
        {"classification": builtin_bundle("lesion-cls")},
        kind="classification",
        providers=("cpu",),
        heat_maps=True,
    )
    lesion = Lesion(center_mm=(-70.0, 30.0, 0.0), radius_mm=10.0, hu=40.0)
    phantom = generate_phantom(PhantomSpec(slices=16, lesions=(lesion,), seed=5))
    files = write_phantom(phantom, tmp_path / "in")
    series = str(phantom.datasets[0].SeriesInstanceUID)
    # When the node processes it
    out = Processor(Config(pipelines=(settings,))).process_series(
        files, "triage", result_files(tmp_path / "out", series, "triage"), uid_seed="occlusion"
    )
    # Then a heat map comes with the SR (no SEG), on at most EXPLAINED_SLICES slices ...
    assert out.segmentation is None and len(out.heat_maps) == 1
    assert out.files == [out.heat_maps[0], out.report]
    pm = pydicom.dcmread(out.heat_maps[0])
    uids = [str(ds.SOPInstanceUID) for ds in phantom.datasets]
    levels = np.zeros((len(uids), *pm.pixel_array.shape[1:]), dtype=np.int32)
    for i, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        levels[uids.index(str(source.ReferencedSOPInstanceUID))] = pm.pixel_array[i]
    explained = np.flatnonzero(levels.reshape(len(levels), -1).any(axis=1))
    assert 1 <= len(explained) <= EXPLAINED_SLICES
    (mapping,) = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert mapping.LUTExplanation == "occlusion sensitivity of lesion"
    # ... hot on the lesion: hiding it is what lowers the probability, and only around it
    # (at the map's resolution: patches of 2/12 of the slice)
    truth = phantom.mask
    hottest = int(np.argmax(levels.reshape(len(levels), -1).sum(axis=1)))
    assert truth[hottest].any()
    assert levels[hottest][truth[hottest]].mean() >= 128  # at least half the probability
    assert (levels[hottest] > 0).mean() < 0.15
    require_tool("dciodvfy")
    for path in out.files:
        report = run_dciodvfy(path)
        assert report.errors == [], report.output
