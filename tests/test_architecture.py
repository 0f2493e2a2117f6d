"""The shape of docs/architecture.md, checked: imports point down, tables have one owner."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "dicomnode"

#: Bottom to top.  A module may import its own layer and those listed before it.
LAYERS = [
    {"errors", "fsutil", "audit", "schema", "states", "uids", "db", "shared"},
    {"routing"},
    {"config"},
    {"spool"},
    {"net"},
    {"imaging"},
    {"inference"},
    {"pipelines"},
    {"outputs"},
    {"jobs"},
    {"delivery"},
    {"feedback"},
    {"web"},
    {"app"},
    {"cli"},
]
BESIDE = {"synthetic", "models", "converters"}  # not runtime layers
OWNERS = {"db.py", "spool/index.py", "spool/feedback.py", "jobs/store.py", "delivery/store.py"}


def layer_of(part: str) -> int:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"dicomnode.{part} is in no layer of this test")


def runtime_modules() -> list[Path]:
    return [
        p
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).parts[0].removesuffix(".py") not in BESIDE
        and p.name != "__init__.py"
    ]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_imports_point_down_only() -> None:
    wrong = []
    for path in runtime_modules():
        own = layer_of(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
        for name in imported(path):
            if not name.startswith("dicomnode."):
                continue
            part = name.split(".")[1]
            if part in BESIDE:
                # the CLI and the app (demo) use them; config finds the shipped bundles
                if own < layer_of("app") and name != "dicomnode.models":
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
                continue
            if layer_of(part) > own:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name} (a layer above)")
    assert wrong == []


def test_third_party_frameworks_stay_in_their_layer() -> None:
    allowed = {"pynetdicom": "net", "highdicom": "outputs", "tensorflow": "-", "tf2onnx": "-"}
    allowed["ray"] = "app"  # app/raybackend.py and app/rayjobs.py, imported only when asked
    wrong = []
    for path in runtime_modules():
        layer = path.relative_to(PACKAGE).parts[0]
        for name in imported(path):
            top = name.split(".")[0]
            if top in allowed and allowed[top] != layer:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert wrong == []


def test_only_the_owners_run_sql() -> None:
    running = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if re.search(r"\.execute(many|script)?\(", p.read_text())
    }
    assert running == OWNERS
