"""Segmentation + classifier through the node: each SR group names its own model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.app.processor import Processor
from dicomnode.config import Config, PipelineSettings, builtin_bundle
from dicomnode.outputs.layout import result_files
from dicomnode.outputs.validate import run_dciodvfy
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

ALGORITHM_NAME, ALGORITHM_VERSION, ALGORITHM_PARAMETERS = "111001", "111003", "111002"


def algorithm_rows(item: Dataset) -> dict[str, list[str]]:
    """The TID 4019 rows directly under a content item: {code value: [text values]}."""
    rows: dict[str, list[str]] = {}
    for child in item.ContentSequence:
        code = child.ConceptNameCodeSequence[0].CodeValue
        if code in {ALGORITHM_NAME, ALGORITHM_VERSION, ALGORITHM_PARAMETERS}:
            rows.setdefault(code, []).append(str(child.TextValue))
    return rows


def test_classification_names_the_classifier_and_findings_the_segmenter(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    # Given the lesion pipeline with the shipped segmentation and classification bundles
    settings = PipelineSettings(
        "lesion",
        {
            "segmentation": builtin_bundle("lesion-seg"),
            "classification": builtin_bundle("lesion-cls"),
        },
        providers=("cpu",),
    )
    processor = Processor(Config(pipelines=(settings,)))
    phantom = generate_phantom(PhantomSpec(slices=40, seed=21))
    files = write_phantom(phantom, tmp_path / "in")
    series = str(phantom.datasets[0].SeriesInstanceUID)

    # When the node processes the series
    out = processor.process_series(
        files, "lesion", result_files(tmp_path / "out", series, "lesion"), uid_seed="algorithms"
    )

    # Then each finding group, and its measurements, names lesion-seg with its settings
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(out.report).content)
    segmenter = {
        ALGORITHM_NAME: ["lesion-seg"],
        ALGORITHM_VERSION: ["1.1.1"],
        ALGORITHM_PARAMETERS: ["threshold=0.4", "min_component_volume_mm3=10"],
    }
    findings = report.get_volumetric_roi_measurement_groups()
    assert len(findings) == len(phantom.lesions)
    for group in findings:
        assert algorithm_rows(group[0]) == segmenter
        for measurement in group.get_measurements():
            assert algorithm_rows(measurement[0]) == segmenter
    # And the classification group and its probability name lesion-cls
    classifier = {
        ALGORITHM_NAME: ["lesion-cls"],
        ALGORITHM_VERSION: ["1.0.0"],
        ALGORITHM_PARAMETERS: ["threshold=0.5", "aggregation=max"],
    }
    (classification,) = report.get_image_measurement_groups()
    assert classification.tracking_identifier == "lesion classification"
    assert algorithm_rows(classification[0]) == classifier
    (probability,) = classification.get_measurements()
    assert algorithm_rows(probability[0]) == classifier
    # And the SEG and the summary stay the segmenter's; the SR lists both models
    assert out.summary["algorithm"] == "lesion-seg 1.1.1"
    assert out.segmentation is not None
    assert dcmread(out.segmentation).ManufacturerModelName == "lesion-seg"
    sr = dcmread(out.report)
    algorithms = [
        item.ManufacturerModelName
        for item in sr.ContributingEquipmentSequence
        for purpose in item.PurposeOfReferenceCodeSequence
        if (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("1630", "99IHE")
    ]
    assert algorithms == ["lesion-seg", "lesion-cls"]
    require_tool("dciodvfy")
    validation = run_dciodvfy(out.report)
    assert validation.errors == [], validation.output
