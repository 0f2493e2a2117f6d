"""Declarative series-selection rules, checked against pydicom's data dictionary.

A rule is a list of alternatives (OR); each alternative is a table of conditions (AND) keyed
by DICOM keyword, or by ``instance_count`` for the number of instances in the series.  A
condition is a scalar (equality) or a table of operators, all of which must hold::

    Modality = "CT"
    ImageType = { contains = "AXIAL" }
    SliceThickness = { le = 5 }
    SeriesDescription = { regex = "(?i)chest|thorax", not = { regex = "(?i)scout" } }
    BodyPartExamined = { in = ["CHEST", "LUNG"] }
    instance_count = { ge = 20 }

Operators: ``equals``, ``regex`` (search, on each value), ``in``, ``contains`` (one of the
values of a multi-valued attribute), ``lt``/``le``/``gt``/``ge`` (numeric), ``exists``
(bool) and ``not`` (a nested condition that must fail).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict

from dicomnode.errors import ConfigError

COUNT_KEY = "instance_count"
_NUMERIC = ("lt", "le", "gt", "ge")
_OPERATORS = ("equals", "regex", "in", "contains", "exists", "not", *_NUMERIC)


@dataclass(frozen=True)
class Condition:
    keyword: str
    operator: str
    operand: Any
    negate: bool = False

    def describe(self) -> str:
        symbols = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "equals": "=="}
        op = symbols.get(self.operator, self.operator)
        text = f"{self.keyword} {op} {self.operand!r}"
        return f"not ({text})" if self.negate else text


@dataclass(frozen=True)
class SeriesRule:
    alternatives: tuple[tuple[Condition, ...], ...]


@dataclass(frozen=True)
class SeriesInfo:
    """What a rule sees of a series: header attributes of one instance plus the count."""

    series_instance_uid: str
    attributes: Mapping[str, Any]
    instance_count: int

    def value(self, keyword: str) -> Any:
        if keyword == COUNT_KEY:
            return self.instance_count
        return self.attributes.get(keyword)


@dataclass(frozen=True)
class Verdict:
    matched: bool
    reasons: tuple[str, ...]


def _check_keyword(keyword: str, where: str) -> None:
    if keyword == COUNT_KEY:
        return
    if keyword not in keyword_dict:
        close = difflib.get_close_matches(keyword, [*keyword_dict, COUNT_KEY], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"'{where}' is not a DICOM keyword (see PS3.6) nor '{COUNT_KEY}'{hint}")
    if dictionary_VR(keyword_dict[keyword]) == "SQ":
        raise ConfigError(f"'{where}' is a sequence; rules match element values only")


def _conditions(keyword: str, spec: Any, where: str, negate: bool = False) -> list[Condition]:
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise ConfigError(f"'{where}' must be a value or a table of operators, not an array")
        return [Condition(keyword, "equals", spec, negate)]
    if not spec:
        raise ConfigError(f"'{where}' has no operator")
    out: list[Condition] = []
    for op, operand in spec.items():
        key = f"{where}.{op}"
        if op not in _OPERATORS:
            close = difflib.get_close_matches(op, _OPERATORS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"'{key}' is not an operator (use one of {', '.join(_OPERATORS)}){hint}"
            )
        if op == "not":
            inner = _conditions(keyword, operand, key, negate=not negate)
            out.extend(inner)
            continue
        if op in _NUMERIC and (isinstance(operand, bool) or not isinstance(operand, int | float)):
            raise ConfigError(f"'{key}' must be a number")
        if op == "in" and not isinstance(operand, list):
            raise ConfigError(f"'{key}' must be an array")
        if op == "exists" and not isinstance(operand, bool):
            raise ConfigError(f"'{key}' must be true or false")
        if op == "regex":
            if not isinstance(operand, str):
                raise ConfigError(f"'{key}' must be a string")
            try:
                re.compile(operand)
            except re.error as exc:
                raise ConfigError(f"'{key}' is not a valid regular expression: {exc}") from exc
        out.append(Condition(keyword, op, operand, negate))
    return out


def parse_rule(tables: Sequence[Mapping[str, Any]], where: str = "match") -> SeriesRule:
    """Validate rule tables (from config) into a :class:`SeriesRule`.

    Every bad condition is reported: the :class:`ConfigError` has one line per problem in
    ``errors``, each starting with the key path in quotes."""
    if not isinstance(tables, Sequence) or isinstance(tables, str) or not tables:
        raise ConfigError(f"'{where}' needs at least one table of conditions ([[...match]])")
    alternatives = []
    errors: list[str] = []
    for i, table in enumerate(tables):
        if not isinstance(table, Mapping):
            errors.append(f"'{where}[{i}]' must be a table of conditions")
            continue
        conds: list[Condition] = []
        for keyword, spec in table.items():
            key = f"{where}[{i}].{keyword}"
            try:
                _check_keyword(keyword, key)
                conds.extend(_conditions(keyword, spec, key))
            except ConfigError as exc:
                errors.append(str(exc))
        alternatives.append(tuple(conds))
    if errors:
        error = ConfigError("\n".join(errors))
        error.errors = tuple(errors)
        raise error
    return SeriesRule(tuple(alternatives))


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _same(a: Any, b: Any) -> bool:
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None and not isinstance(b, str):
        return na == nb
    return str(a).strip() == str(b).strip()


def _holds(cond: Condition, value: Any) -> bool:
    values = _values(value)
    op, x = cond.operator, cond.operand
    if op == "exists":
        return bool(values) is bool(x)
    if not values:
        return False
    if op == "equals":
        if len(values) > 1:
            return "\\".join(str(v) for v in values) == str(x)
        return _same(values[0], x)
    if op == "contains":
        return any(_same(v, x) for v in values)
    if op == "in":
        return any(_same(v, o) for v in values for o in x)
    if op == "regex":
        return any(re.search(x, str(v)) is not None for v in values)
    n = _number(values[0])
    if n is None:
        return False
    return bool({"lt": n < x, "le": n <= x, "gt": n > x, "ge": n >= x}[op])


def evaluate(rule: SeriesRule, series: SeriesInfo) -> Verdict:
    """Does the series match?  The reasons say which conditions failed (or that all held)."""
    failures: list[str] = []
    for i, alternative in enumerate(rule.alternatives):
        failed = [c for c in alternative if _holds(c, series.value(c.keyword)) == c.negate]
        if not failed:
            return Verdict(True, (f"alternative {i + 1}: all {len(alternative)} conditions hold",))
        failures.extend(
            f"alternative {i + 1}: {c.describe()} fails "
            f"({c.keyword} is {series.value(c.keyword)!r})"
            for c in failed
        )
    return Verdict(False, tuple(failures))
