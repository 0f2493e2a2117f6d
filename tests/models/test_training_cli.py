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
