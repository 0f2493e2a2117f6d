"""The training CLI entry points: no TensorFlow at import, a clear error without the extra."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from dicomnode.errors import MissingExtraError
from dicomnode.models import cli


def test_importing_the_cli_does_not_import_tensorflow() -> None:
    code = (
        "import sys, dicomnode.models, dicomnode.models.cli, dicomnode.models.recipe, "
        "dicomnode.models.data, dicomnode.models.evaluate, dicomnode.models.synthetic, "
        "dicomnode.converters; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("main", [cli.train_main, cli.export_main])
def test_missing_train_extra_names_the_extra(
    main: object, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow" else real(name, *a),
    )
    with pytest.raises(MissingExtraError, match=r"dicomnode\[train\]"):
        main(
            ["lesion_seg", "--data", str(tmp_path), "--out", str(tmp_path)]
            if main is cli.train_main
            else [str(tmp_path), "--out", str(tmp_path)]
        )


def test_synth_preset_small_lesions(tmp_path: object) -> None:
    # Given the small-lesion preset (held-out data of issue 12 item 5)
    import json
    from pathlib import Path

    from dicomnode.models.synthetic import PRESETS, draw_spec

    out = Path(str(tmp_path)) / "small"
    # when the CLI writes a data set with it (no cases: only the manifest)
    assert cli.synthetic_main(["--out", str(out), "--cases", "0", "--preset", "small-lesions"]) == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    # then the ranges are the preset's, and its cases are 0.6 mm / 1.25 mm with 3-5 mm lesions
    assert config["pixel_spacing_mm"] == [0.6, 0.6] and config["negative_fraction"] == 0.0
    spec = draw_spec(0, 3, PRESETS["small-lesions"])
    assert spec.pixel_spacing == (0.6, 0.6) and spec.slice_thickness == 1.25
    assert spec.lesion_radius_mm == (3.0, 5.0) and spec.n_lesions >= 2
