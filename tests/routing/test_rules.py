"""Routing rules: equality, regex, ranges, sets, contains, negation, counts, OR of ANDs."""

from __future__ import annotations

from typing import Any

import pytest

from dicomnode.errors import ConfigError
from dicomnode.routing.rules import SeriesInfo, evaluate, parse_rule

CT = {
    "Modality": "CT",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "SliceThickness": "2.5",
    "SeriesDescription": "Thorax 2.5 mm",
    "BodyPartExamined": "CHEST",
}


def series(count: int = 64, **attrs: Any) -> SeriesInfo:
    return SeriesInfo("1.2.3", {**CT, **attrs}, count)


@pytest.mark.parametrize(
    ("rule", "matched"),
    [
        ({"Modality": "CT"}, True),
        ({"Modality": "MR"}, False),
        ({"ImageType": {"contains": "AXIAL"}}, True),
        ({"ImageType": {"contains": "LOCALIZER"}}, False),
        ({"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}, True),
        ({"SliceThickness": {"le": 5}}, True),
        ({"SliceThickness": {"gt": 2.5}}, False),
        ({"SliceThickness": {"ge": 1, "lt": 3}}, True),
        ({"SeriesDescription": {"regex": "(?i)thorax"}}, True),
        ({"SeriesDescription": {"not": {"regex": "(?i)thorax"}}}, False),
        ({"BodyPartExamined": {"in": ["CHEST", "LUNG"]}}, True),
        ({"BodyPartExamined": {"not": {"in": ["CHEST"]}}}, False),
        ({"ContrastBolusAgent": {"exists": False}}, True),
        ({"ContrastBolusAgent": {"exists": True}}, False),
        ({"instance_count": {"ge": 20}}, True),
        ({"instance_count": {"ge": 100}}, False),
        ({"Modality": "CT", "instance_count": {"ge": 100}}, False),
    ],
)
def test_conditions(rule: dict[str, Any], matched: bool) -> None:
    assert evaluate(parse_rule([rule]), series()).matched is matched


def test_alternatives_are_or_and_reasons_name_the_failing_condition() -> None:
    rule = parse_rule([{"Modality": "MR"}, {"Modality": "CT", "instance_count": {"ge": 100}}])
    verdict = evaluate(rule, series(count=30))
    assert not verdict.matched
    assert any("Modality == 'MR'" in r for r in verdict.reasons)
    assert any("instance_count >= 100" in r and "30" in r for r in verdict.reasons)
    assert evaluate(rule, series(count=300)).matched


def test_missing_attribute_fails_comparisons_without_crashing() -> None:
    rule = parse_rule([{"SpacingBetweenSlices": {"le": 5}}])
    assert not evaluate(rule, series()).matched


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"NotAKeyword": "x"}, "not a DICOM keyword"),
        ({"ReferencedImageSequence": "x"}, "sequence"),
        ({"Modality": {"matches": "CT"}}, "is not an operator"),
        ({"Modality": {"regex": "("}}, "regular expression"),
        ({"SliceThickness": {"le": "5"}}, "must be a number"),
        ({"Modality": ["CT", "MR"]}, "not an array"),
    ],
)
def test_invalid_rules_are_rejected_at_start_up(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_rule([rule])
