"""The SR names, per group, the model that produced it (TID 4019 in each TID 1501/1411)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.errors import OutputError
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_measurement_report
from dicomnode.pipelines.results import AlgorithmInfo, Classification, SegmentResult

from .cases import ALGORITHM, LESION, NODULE, Case
from .test_sr import assert_validators_clean, build_pair, report_of

CaseFactory = Callable[[str], Case]
ALGORITHM_NAME, ALGORITHM_VERSION, ALGORITHM_PARAMETERS = "111001", "111003", "111002"
SEGMENTER = replace(ALGORITHM, parameters=("threshold=0.5", "min_component_volume_mm3=10"))
CLASSIFIER = AlgorithmInfo(
    name="lesion-cls",
    version="2.1.0",
    manufacturer="dicomnode",
    parameters=("threshold=0.35", "aggregation=max"),
)


def algorithm_rows(item: Dataset) -> dict[str, list[str]]:
    """The TID 4019 rows directly under a content item: {code value: [text values]}."""
    rows: dict[str, list[str]] = {}
    for child in item.ContentSequence:
        code = child.ConceptNameCodeSequence[0].CodeValue
        if code in {ALGORITHM_NAME, ALGORITHM_VERSION, ALGORITHM_PARAMETERS}:
            rows.setdefault(code, []).append(str(child.TextValue))
    return rows


def expected_rows(algorithm: AlgorithmInfo) -> dict[str, list[str]]:
    rows = {ALGORITHM_NAME: [algorithm.name], ALGORITHM_VERSION: [algorithm.version]}
    if algorithm.parameters:
        rows[ALGORITHM_PARAMETERS] = list(algorithm.parameters)
    return rows


def two_model_result(case: Case) -> Any:
    """Findings of segment 1 and an empty segment 2 from the segmenter, a classification
    from the classifier; the result's algorithm is the bare segmenter (as for the SEG)."""
    empty = np.zeros_like(case.mask)
    return replace(
        case.result,
        segments=(
            replace(case.result.segments[0], algorithm=SEGMENTER),
            SegmentResult(2, NODULE, empty, SEGMENTER),
        ),
        findings=tuple(replace(f, algorithm=SEGMENTER) for f in case.result.findings),
        classifications=(Classification(LESION, 0.8125, True, CLASSIFIER),),
    )


def test_each_group_names_the_model_that_produced_it(
    case_factory: CaseFactory, tmp_path: Path
) -> None:
    # Given findings from the segmenter and a classification from a different classifier
    case = case_factory("axial")
    result = two_model_result(case)

    # When the SEG and the SR are built, written and read back
    _, path, sr = build_pair(case, tmp_path, result=result)

    # Then every finding group, and each of its measurements, names the segmenter
    report = report_of(sr)
    findings = report.get_volumetric_roi_measurement_groups()
    assert len(findings) == len(result.findings) > 0
    for group in findings:
        assert algorithm_rows(group[0]) == expected_rows(SEGMENTER)
        for measurement in group.get_measurements():
            assert algorithm_rows(measurement[0]) == expected_rows(SEGMENTER)
    # And the classification group and its probability name the classifier
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    assert set(groups) == {"Lesion classification", "Nodule: none found"}
    classification = groups["Lesion classification"]
    assert algorithm_rows(classification[0]) == expected_rows(CLASSIFIER)
    (probability,) = classification.get_measurements()
    assert algorithm_rows(probability[0]) == expected_rows(CLASSIFIER)
    # And the "none found" group names the segmenter that found nothing
    assert algorithm_rows(groups["Nodule: none found"][0]) == expected_rows(SEGMENTER)
    assert_validators_clean(path)


def test_both_models_are_observers_and_contributing_equipment(
    case_factory: CaseFactory, tmp_path: Path
) -> None:
    case = case_factory("axial")
    _, _, sr = build_pair(case, tmp_path, result=two_model_result(case))

    # The primary (segmentation) model is the first device observer, the classifier next
    devices = report_of(sr).get_observer_contexts(observer_type=codes.DCM.Device)
    names = [d.observer_identifying_attributes.name for d in devices]
    assert names == ["lesion-seg", "lesion-cls"]
    uids = {d.observer_identifying_attributes.uid for d in devices}
    assert len(uids) == 2
    # And each is listed once as a Processing Algorithm (IHE AIR)
    algorithms = [
        (item.ManufacturerModelName, item.SoftwareVersions[0])
        for item in sr.ContributingEquipmentSequence
        for p in item.PurposeOfReferenceCodeSequence
        if (p.CodeValue, p.CodingSchemeDesignator) == ("1630", "99IHE")
    ]
    assert algorithms == [("lesion-seg", "1.0.0"), ("lesion-cls", "2.1.0")]
    # The SR series itself is the primary model's
    assert sr.ManufacturerModelName == "lesion-seg"


def test_items_without_an_algorithm_are_the_results(
    case_factory: CaseFactory, tmp_path: Path
) -> None:
    case = case_factory("axial")
    _, _, sr = build_pair(case, tmp_path)

    report = report_of(sr)
    for group in [
        *report.get_volumetric_roi_measurement_groups(),
        *report.get_image_measurement_groups(),
    ]:
        assert algorithm_rows(group[0]) == expected_rows(ALGORITHM)
    assert len(report.get_observer_contexts(observer_type=codes.DCM.Device)) == 1


@pytest.mark.parametrize(
    ("algorithm", "pattern"),
    [
        (replace(CLASSIFIER, name=""), r"result\.classifications\[0\]\.algorithm\.name"),
        (
            replace(CLASSIFIER, version="x" * 65),
            r"result\.classifications\[0\]\.algorithm\.version",
        ),
        (
            replace(CLASSIFIER, parameters=("",)),
            r"classifications\[0\]\.algorithm\.parameters\[0\]",
        ),
        (replace(CLASSIFIER, parameters="threshold=0.5"), r"algorithm\.parameters must be a tuple"),
    ],
)
def test_invalid_item_algorithm_is_refused_naming_it(
    algorithm: AlgorithmInfo, pattern: str, case_factory: CaseFactory
) -> None:
    case = case_factory("axial")
    seg = build_segmentation(case.result, case.source)
    result = replace(case.result, classifications=(Classification(LESION, 0.5, True, algorithm),))
    with pytest.raises(OutputError, match=pattern):
        build_measurement_report(result, case.source, seg)
