"""``dicomnode batch --workers N``: studies in a pool of local processes (no Ray).

Given a folder of studies (one that fails, one no route matches), when it is converted by
two processes, then the files and the manifest are those of the one-process batch, the
failed study is reported, and a second run skips what is done.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.app.batch import run_batch
from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.synthetic.phantom import PhantomSpec

from .outputs import CREATED, assert_same_results
from .test_ray_batch import write_config, write_studies, write_untidy

pytestmark = pytest.mark.slow


def test_pool_of_two_processes_is_the_one_process_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    write_studies(tmp_path / "in", 4, PhantomSpec(rows=64, columns=64, slices=10, lesions=()))
    write_untidy(tmp_path / "in")
    one = run_batch(
        load_config(config), tmp_path / "in", tmp_path / "one", progress=False, created=CREATED
    )

    argv = ["batch", str(tmp_path / "in"), str(tmp_path / "two"), "--config", str(config)]
    argv += ["--created-at", CREATED.isoformat()]
    code = main([*argv, "--workers", "2", "--no-progress"])

    out = capsys.readouterr().out
    assert code == 1 and "4 done, 0 skipped" in out and "1 ignored (no route), 1 failed" in out
    assert len(one.done) == 4 and len(one.failed) == 1
    assert_same_results(tmp_path / "one", tmp_path / "two")
    assert main([*argv, "--workers", "2", "--no-progress"]) == 1
    assert "0 done, 4 skipped (already done)" in capsys.readouterr().out
