"""build_parametric_map: the heat map frame for frame on its source, header, validators."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.errors import OutputError
from dicomnode.imaging.series import source_datasets
from dicomnode.outputs.pm import build_parametric_map
from dicomnode.outputs.validate import run_dciodvfy
from dicomnode.pipelines.results import HeatMap, PipelineResult

from .cases import GEOMETRIES, LESION, Case, require_tool
from .test_enhanced import SPECS, _enhanced

CaseFactory = Callable[[str], Case]

#: What dciodvfy (dicom3tools 1.00) says of every Parametric Map, highdicom's own
#: included: its dictionary predates the defined term QUANTITY (PS3.3 C.8.32.1.1.1),
#: and a Laterality the node cannot know is empty.
KNOWN_WARNINGS = (
    "Unrecognized defined term <QUANTITY> for value 4 of attribute <Image Type>",
    "Unrecognized defined term <QUANTITY> for value 4 of attribute <Frame Type>",
    "attribute <Laterality>",
)


def assert_pm_clean(path: Path) -> None:
    require_tool("dciodvfy")
    report = run_dciodvfy(path)
    assert report.errors == [], report.output
    unexpected = [w for w in report.warnings if not any(k in w for k in KNOWN_WARNINGS)]
    assert unexpected == [], report.output


def heat_values(result: PipelineResult) -> npt.NDArray[np.uint8]:
    """A map that differs on every slice and pixel: a gradient plus the mask."""
    s, r, c = result.volume.shape
    grid = np.indices((s, r, c)).sum(axis=0) % 200
    mask = result.segments[0].mask
    return np.asarray(grid + 55 * mask, dtype=np.uint8)


def with_heat_map(result: PipelineResult, values: object = None) -> PipelineResult:
    chosen = heat_values(result) if values is None else values
    return replace(
        result,
        heat_maps=(HeatMap(LESION, chosen, "segmentation probability"),),  # type: ignore[arg-type]
    )


def frames_by_slice(pm: Dataset, result: PipelineResult) -> dict[int, int]:
    """Slice index k -> PM frame index, from each frame's source reference."""
    slices: dict[tuple[str, int], int] = {}
    for k, uid in enumerate(result.volume.sop_instance_uids):
        slices[(uid, result.volume.frame_number(k))] = k
    found = {}
    for i, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        (derivation,) = frame.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        key = (str(source.ReferencedSOPInstanceUID), int(source.get("ReferencedFrameNumber", 0)))
        found[slices[key]] = i
    return found


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_parametric_map_holds_the_heat_map_on_its_source_slices(
    geometry: str, case_factory: CaseFactory, tmp_path: Path
) -> None:
    # Given a result with a heat map that differs on every slice
    case = case_factory(geometry)
    result = with_heat_map(case.result)
    # When the map is built, written and read back
    pm = build_parametric_map(result, case.source, uid_seed="pm")
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    # Then frame by frame it holds the values of the slice it derives from
    pixels = back.pixel_array
    order = frames_by_slice(back, result)
    assert sorted(order) == list(range(result.volume.shape[0]))
    for k, i in order.items():
        assert np.array_equal(pixels[i], result.heat_maps[0].values[k]), f"slice {k}"
    # ... the mapping turns levels into probabilities, and says what they explain
    (mapping,) = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert float(mapping.RealWorldValueSlope) == pytest.approx(1 / 255)
    assert float(mapping.RealWorldValueIntercept) == 0.0
    assert mapping.LUTExplanation == "segmentation probability of Lesion"
    assert back.StudyInstanceUID == result.volume.study_instance_uid
    assert back.FrameOfReferenceUID == result.volume.frame_of_reference_uid
    assert back.ContributingEquipmentSequence[-1].ManufacturerModelName == "lesion-seg"
    assert "heat map" in back.SeriesDescription
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == (result.volume.series_instance_uid)
    assert_pm_clean(path)


@pytest.mark.parametrize("geometry", sorted(SPECS))
def test_parametric_map_of_an_enhanced_ct_references_its_frames(
    geometry: str, tmp_path: Path
) -> None:
    # Given an enhanced multi-frame CT and a heat map on its volume
    case = _enhanced(tmp_path, SPECS[geometry])
    result = with_heat_map(case.result)
    sources = source_datasets(case.volume)
    # When the map is built
    pm = build_parametric_map(result, sources, uid_seed="enhanced")
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    # Then each frame names the source frame of its slice and holds that slice's values
    pixels = back.pixel_array
    order = frames_by_slice(back, result)
    assert sorted(order) == list(range(result.volume.shape[0]))
    for k, i in order.items():
        assert np.array_equal(pixels[i], result.heat_maps[0].values[k]), f"slice {k}"
    assert_pm_clean(path)


def test_uid_seed_gives_the_same_uids(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    result = with_heat_map(case.result)
    a = build_parametric_map(result, case.source, uid_seed="seed")
    b = build_parametric_map(result, case.source, uid_seed="seed")
    c = build_parametric_map(result, case.source, uid_seed="other")
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != c.SOPInstanceUID


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("float", "must be a numpy uint8 array"),
        ("shape", "has shape"),
        ("none", "does not exist"),
        ("method", "method must be a non-empty string"),
    ],
)
def test_invalid_heat_map_raises_output_error_naming_it(
    change: str, message: str, case_factory: CaseFactory
) -> None:
    case = case_factory("axial")
    values = heat_values(case.result)
    if change == "float":
        result = with_heat_map(case.result, values.astype(np.float32))
    elif change == "shape":
        result = with_heat_map(case.result, values[:-1])
    elif change == "none":
        result = case.result
    else:
        result = replace(case.result, heat_maps=(HeatMap(LESION, values, " "),))
    with pytest.raises(OutputError, match=message):
        build_parametric_map(result, case.source)


def test_source_in_another_order_is_refused(case_factory: CaseFactory) -> None:
    case = case_factory("axial")
    with pytest.raises(OutputError, match="slice order"):
        build_parametric_map(with_heat_map(case.result), case.source[::-1])
