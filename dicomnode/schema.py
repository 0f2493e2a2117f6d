"""One way to validate documents: the node configuration, model cards, training recipes.

Each document is a tree of frozen pydantic dataclasses (strict types, unknown keys
rejected) validated in JSON mode from the parsed TOML or JSON, so that lists become tuples
and strings become paths without any other coercion.  :func:`validate_document` reports
every error at once, each line naming its key path (``routes[0].match[1].SliceThickness``)
and, for an unknown key, the closest known key ("did you mean ...?").  The JSON Schema of
each document (:func:`json_schema`) is exported into ``docs/`` for editors.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from dicomnode.errors import DicomNodeError

T = TypeVar("T")

#: The pydantic configuration of every document class.
STRICT = ConfigDict(strict=True, extra="forbid", validate_default=False)

_UNKNOWN_KEY = {"unexpected_keyword_argument", "extra_forbidden"}


def key_error(message: str) -> PydanticCustomError:
    """An error whose message already names its key path relative to the field it is
    raised for (``'match[0].Modalityy' is not ...``); the path is completed by
    :func:`format_errors`."""
    return PydanticCustomError("document_key", "{message}", {"message": message})


def key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(annotation: Any) -> list[Any]:
    """The classes a field's annotation may hold (Optional, tuple[X, ...], Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, tuple, list, dict):
        return [c for arg in typing.get_args(annotation) for c in _unwrap(arg)]
    return [annotation]


def _known_keys(root: type, loc: Sequence[int | str]) -> list[str]:
    """Field names of the document class found at ``loc`` (for "did you mean")."""
    classes: list[Any] = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        found = []
        for cls in classes:
            if dataclasses.is_dataclass(cls):
                hints = typing.get_type_hints(cls, include_extras=True)
                if part in hints:
                    found.extend(_unwrap(hints[part]))
        classes = found
    return [f.name for c in classes if dataclasses.is_dataclass(c) for f in dataclasses.fields(c)]


def format_errors(root: type, exc: ValidationError) -> list[str]:
    """One line per error: key path, what is wrong, and a suggestion for unknown keys."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        path = key_path(loc) or "(document)"
        if error["type"] in _UNKNOWN_KEY:
            unknown = str(loc[-1])
            close = difflib.get_close_matches(unknown, _known_keys(root, loc[:-1]), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"'{path}' is an unknown key{hint}")
        elif error["type"] == "document_key":
            parent = key_path(loc[:-1])
            field = str(loc[-1]) if loc else ""
            for message in str(error["msg"]).splitlines():
                if parent and field:
                    message = message.replace(f"'{field}", f"'{parent}.{field}", 1)
                lines.append(message)
        elif error["type"] == "missing_argument" or error["type"] == "missing":
            lines.append(f"'{path}' is required")
        else:
            lines.append(f"'{path}': {error['msg']}")
    return lines


def validate_document(
    cls: type[T],
    data: Any,
    *,
    what: str,
    error: type[DicomNodeError],
    context: dict[str, Any] | None = None,
) -> T:
    """Validate parsed TOML/JSON ``data`` into ``cls``; raise ``error`` listing all errors.

    ``error`` must accept one message argument (``ConfigError``, ``ModelError``)."""
    try:
        text = json.dumps(data)
    except (TypeError, ValueError) as exc:
        raise error(f"{what}: not a plain document: {exc}") from exc
    try:
        return TypeAdapter(cls).validate_json(text, context=context)
    except ValidationError as exc:
        lines = format_errors(cls, exc)
        count = f"{len(lines)} error" + ("s" if len(lines) > 1 else "")
        raised = error(f"{what}: {count}\n  " + "\n  ".join(lines))
        raised.errors = tuple(lines)
        raise raised from None


def json_schema(cls: type, title: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a document class, for editors."""
    schema: dict[str, Any] = TypeAdapter(cls).json_schema(mode="validation")
    schema["title"] = title
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
