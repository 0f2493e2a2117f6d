"""Configuration: every key validated before anything binds; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import SENDER, builtin_bundle, default_config_path, load_config
from dicomnode.errors import ConfigError

BASE = """
[node]
ae_title = "NODE"
port = 5104
data_dir = "data"

[[remotes]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 5105

[[folders]]
name = "out"
path = "results"

[[pipelines]]
name = "lesion"
bundles.segmentation = "bundles/seg"

[[routes]]
name = "ct"
pipeline = "lesion"
destinations = ["pacs", "out", "@sender"]
[[routes.match]]
Modality = "CT"
SliceThickness = { le = 5 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_valid_config_is_loaded_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.node.ae_title == "NODE"
    assert cfg.node.data_dir == tmp_path / "data"
    assert cfg.pipelines[0].bundles["segmentation"] == tmp_path / "bundles" / "seg"
    assert cfg.folders[0].path == tmp_path / "results"
    assert cfg.routes[0].destinations == ("pacs", "out", SENDER)
    assert cfg.remote_by_ae("PACS") is not None


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        (("port = 5104", "port = 70000"), "node.port"),
        (("port = 5104", 'port = "x"'), "node.port"),
        (('ae_title = "NODE"', 'ae_title = "WAY_TOO_LONG_AE_TITLE"'), "node.ae_title"),
        (("[node]", '[node]\ncolour = "red"'), "node.colour"),
        (('Modality = "CT"', 'Modalityy = "CT"'), "routes[0].match[0].Modalityy"),
        (
            ("SliceThickness = { le = 5 }", "SliceThickness = { below = 5 }"),
            "routes[0].match[0].SliceThickness.below",
        ),
        (
            ("SliceThickness = { le = 5 }", 'SliceThickness = { le = "five" }'),
            "routes[0].match[0].SliceThickness.le",
        ),
        (
            ('destinations = ["pacs", "out", "@sender"]', 'destinations = ["nowhere"]'),
            "routes[0].destinations",
        ),
        (('pipeline = "lesion"', 'pipeline = "other"'), "routes[0].pipeline"),
        (("[[folders]]", "[[folders]]\nmode = 1"), "folders[0].mode"),
    ],
)
def test_wrong_key_or_value_is_an_error_naming_the_key(
    tmp_path: Path, patch: tuple[str, str], key: str
) -> None:
    text = BASE.replace(*patch, 1)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text))


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[node\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_embedded_default_config_is_valid_and_uses_shipped_bundles() -> None:
    cfg = load_config(default_config_path())
    assert cfg.pipelines[0].bundles["segmentation"] == builtin_bundle("lesion-seg")
    assert cfg.routes[0].destinations == (SENDER,)


def test_overrides_patch_node_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), {"port": 6000})
    assert cfg.node.port == 6000


def test_backoff_grows_exponentially_and_is_capped(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE + "\n[jobs]\nbackoff_initial_s = 1\nbackoff_max_s = 5\n")
    )
    assert [cfg.jobs.delay(a) for a in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]


def test_example_config_in_the_repository_is_valid() -> None:
    cfg = load_config(Path(__file__).parent.parent / "config" / "node.toml")
    assert cfg.routes[0].destinations == (SENDER, "archive", "ris")
    assert cfg.node.allowed_callers[0].hosts == ("127.0.0.1",)


def test_every_error_is_reported_at_once_with_key_paths_and_suggestions(tmp_path: Path) -> None:
    text = (
        BASE.replace("port = 5104", "port = 70000", 1)
        .replace("[node]", '[node]\nae_tite = "X"', 1)
        .replace('Modality = "CT"', 'Modalty = "CT"', 1)
        .replace("SliceThickness = { le = 5 }", "SliceThickness = { lte = 5 }", 1)
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    errors = caught.value.errors
    assert "'node.ae_tite' is an unknown key; did you mean 'ae_title'?" in errors
    assert any(e.startswith("'node.port'") for e in errors)
    assert any(
        e.startswith("'routes[0].match[0].Modalty' is not a DICOM keyword")
        and "did you mean 'Modality'?" in e
        for e in errors
    )
    assert any(
        e.startswith("'routes[0].match[0].SliceThickness.lte' is not an operator")
        and "did you mean 'lt'?" in e
        for e in errors
    )
    assert len(errors) == 4, errors


def test_references_between_sections_are_all_reported(tmp_path: Path) -> None:
    text = BASE.replace('pipeline = "lesion"', 'pipeline = "lesoin"').replace(
        '"pacs", "out", "@sender"', '"pacs", "nowhere", "elsewhere"'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert len(caught.value.errors) == 3, caught.value.errors


def test_json_schemas_in_docs_are_current() -> None:
    """docs/*.schema.json are what `dicomnode schema NAME` prints (regenerate them with it)."""
    import json

    from dicomnode.cli import document_schemas

    docs = Path(__file__).parent.parent / "docs"
    for name, schema in document_schemas().items():
        written = json.loads((docs / f"{name}.schema.json").read_text())
        assert written == json.loads(json.dumps(schema)), f"regenerate docs/{name}.schema.json"
