"""Fail at start, not per study: a bad bundle, data directory or destination stops the node
before it binds its port, with every problem named."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dicomnode.cli import main

CONFIG = """
[node]
port = {port}
data_dir = "{data_dir}"
min_free_disk_mb = 0

[[remotes]]
name = "pacs"
ae_title = "PACS"
host = "{host}"
port = 4243

[[folders]]
name = "archive"
path = "{folder}"

[[pipelines]]
name = "lesion"
bundles.segmentation = "{segmentation}"

[[routes]]
name = "ct"
pipeline = "lesion"
destinations = ["pacs", "archive"]
[[routes.match]]
Modality = "CT"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(tmp_path: Path, **changes: object) -> Path:
    values: dict[str, object] = {
        "port": free_port(),
        "data_dir": tmp_path / "data",
        "host": "127.0.0.1",
        "folder": tmp_path / "archive",
        "segmentation": "builtin:lesion-seg",
        **changes,
    }
    path = tmp_path / "node.toml"
    path.write_text(CONFIG.format(**values))
    return path


def test_a_good_configuration_is_ok_and_lists_its_bundles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(write(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "pipeline 'lesion': kind 'lesion'; segmentation lesion-seg" in out


def test_a_misspelt_bundle_fails_check_config_naming_pipeline_and_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The new user's mistake from the issue: it used to print OK
    config = write(tmp_path, segmentation="builtin:lesion-segg")
    assert main(["check-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "pipeline 'lesion': bundles.segmentation" in err and "lesion-segg" in err


def test_serve_with_a_bad_bundle_exits_before_binding_its_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    config = write(tmp_path, port=port, segmentation=tmp_path / "missing-bundle")
    assert main(["serve", "--config", str(config)]) == 2
    assert "missing-bundle" in capsys.readouterr().err
    with socket.socket() as s:  # nothing was bound: the port is still free
        s.bind(("127.0.0.1", port))
    assert not (tmp_path / "data" / "index.sqlite3").exists()


def test_every_problem_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write(
        tmp_path,
        data_dir=blocker / "data",
        folder=blocker / "archive",
        host="no-such-host.invalid",
        segmentation="builtin:lesion-cls",  # a classifier where a segmenter is needed
    )
    assert main(["check-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err
    assert "[node].data_dir" in err and "folder destination 'archive'" in err
    assert "remote 'pacs': host 'no-such-host.invalid' does not resolve" in err
    assert "is a classification model" in err


def test_an_hl7_destination_whose_host_does_not_resolve_stops_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path)
    config.write_text(
        config.read_text() + '\n[[hl7]]\nname = "ris"\nhost = "no-such-ris.invalid"\nport = 2575\n'
    )
    assert main(["check-config", str(config)]) == 2
    assert "HL7 destination 'ris': host 'no-such-ris.invalid' does not resolve" in (
        capsys.readouterr().err
    )
