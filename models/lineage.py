"""A bundle's lineage: the bundle it succeeds and the data it saw, recorded in its card.

``dicomnode export RUN --out NEW --parent CURRENT --version 1.0.1`` writes ``NEW`` as the
next version of ``CURRENT``: its card's ``version`` is the one given, and its
``provenance`` gains

- ``parent``: name, version, sha256 and folder of ``CURRENT``;
- ``training_data``: the folders the run trained on, the run it was fine-tuned from
  (``dicomnode train --init-from``), and the corrections among the data (each
  ``<sop>.json`` a node wrote beside a corrected SEG in ``data_dir/feedback``: feedback
  id, SOP Instance UID, what it corrects).

The node switches by configuration (``bundles.segmentation = "/models/lesion-seg-1.0.1"``)
and rolls back by pointing at the parent's folder again; every bundle version is a folder
of its own, so both stay on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dicomnode.errors import ModelError
from dicomnode.inference.card import CARD_FILE, Bundle, load_bundle
from dicomnode.models.recipe import parse_recipe
from dicomnode.models.run import RunFiles


def check_lineage(checkpoint: Path, parent: Path | None, version: str | None) -> Bundle | None:
    """Before exporting: the parent loads, and the new version differs from it."""
    if parent is None:
        return None
    bundle = load_bundle(parent)
    run = RunFiles.locate(checkpoint)
    recipe = parse_recipe(run.read_recipe_dict(), source=run.recipe.read_text())
    new_version = version or recipe.bundle.version
    if recipe.bundle.name == bundle.card.name and new_version == bundle.card.version:
        raise ModelError(
            f"the new bundle would be {bundle.card.name} {new_version}, the version of its "
            f"parent {parent}: give --version"
        )
    return bundle


def corrections_in(folder: Path) -> list[dict[str, Any]]:
    """The corrections (node feedback) among a training folder's files."""
    found = []
    for path in sorted(folder.rglob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and "feedback_id" in document:
            found.append(
                {
                    "feedback_id": document["feedback_id"],
                    "sop_instance_uid": document.get("sop_instance_uid"),
                    "corrects": document.get("corrects", {}),
                }
            )
    return found


def training_data(checkpoint: Path) -> dict[str, Any]:
    """What the run saw: its data folders, the run it started from, the corrections."""
    run = RunFiles.locate(checkpoint)
    info = json.loads(run.training.read_text()) if run.training.is_file() else {}
    folders = info.get("data_dir") or []
    folders = [folders] if isinstance(folders, str) else list(folders)
    return {
        "folders": folders,
        "init_from": info.get("init_from"),
        "description": info.get("data_description", ""),
        "corrections": [c for f in folders for c in corrections_in(Path(f))],
    }


def record_lineage(
    bundle: Bundle, checkpoint: Path, parent: Bundle | None, version: str | None
) -> Bundle:
    """Rewrite the exported card with its version, parent and training data; reload it."""
    path = bundle.path / CARD_FILE
    card = json.loads(path.read_text())
    if version:
        card["version"] = version
    provenance = card.setdefault("provenance", {})
    provenance["training_data"] = training_data(checkpoint)
    if parent is not None:
        provenance["parent"] = {
            "name": parent.card.name,
            "version": parent.card.version,
            "sha256": parent.card.sha256,
            "path": str(parent.path),
        }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return load_bundle(bundle.path)
