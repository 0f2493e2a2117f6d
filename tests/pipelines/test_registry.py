"""Pipelines by registry: entry points, checks before any session, the worked example."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app.processor import Processor
from dicomnode.config import Config, PipelineSettings, builtin_bundle
from dicomnode.errors import ConfigError
from dicomnode.outputs.layout import result_files
from dicomnode.outputs.validate import run_dciodvfy
from dicomnode.pipelines import registry
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "hu_threshold.py"
SEG = builtin_bundle("lesion-seg")
CLS = builtin_bundle("lesion-cls")


@pytest.fixture
def example_installed(tmp_path: Path) -> Iterator[None]:
    """Install docs/examples/hu_threshold.py as a distribution that declares the entry
    point, exactly as a hospital's own package would (a .dist-info on sys.path)."""
    site = tmp_path / "site"
    info = site / "hu_threshold_example-1.0.dist-info"
    info.mkdir(parents=True)
    shutil.copy(EXAMPLE, site / "hu_threshold.py")
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hu-threshold-example\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[dicomnode.pipelines]\nhu-threshold = hu_threshold:KIND\n"
    )
    sys.path.insert(0, str(site))
    registry.pipeline_kinds.cache_clear()
    yield
    sys.path.remove(str(site))
    sys.modules.pop("hu_threshold", None)
    registry.pipeline_kinds.cache_clear()


def phantom_series(tmp_path: Path, slices: int = 24) -> list[Path]:
    spec = PhantomSpec(rows=128, columns=128, slices=slices, pixel_spacing=(2.8, 2.8), seed=3)
    return write_phantom(generate_phantom(spec), tmp_path / "in")


def test_shipped_kinds_are_registered_by_entry_point() -> None:
    kinds = registry.pipeline_kinds()
    assert {"lesion", "classification"} <= set(kinds)
    assert kinds["lesion"].roles["segmentation"].required
    assert not kinds["lesion"].roles["classification"].required
    assert not kinds["classification"].emits_segmentation


def test_unknown_kind_names_the_pipeline_and_suggests() -> None:
    with pytest.raises(
        ConfigError, match=r"pipeline 'p'.*unknown pipeline kind 'lesoin'.*'lesion'"
    ):
        registry.check_pipeline(PipelineSettings("p", {"segmentation": SEG}, kind="lesoin"))


def test_every_bundle_problem_is_reported_at_once(tmp_path: Path) -> None:
    # Given a copy of the shipped segmentation bundle whose model file was altered
    tampered = tmp_path / "tampered"
    shutil.copytree(SEG, tampered)
    with (tampered / "model.onnx").open("ab") as f:
        f.write(b"\0")
    settings = PipelineSettings(
        "chest",
        {"segmentation": tampered, "classification": SEG, "detector": CLS},
    )
    # When the pipeline is checked
    with pytest.raises(ConfigError) as caught:
        registry.check_pipeline(settings)
    # Then each problem is one line naming the pipeline, the role and the path
    errors = caught.value.errors
    assert len(errors) == 3, errors
    assert any("bundles.segmentation" in e and str(tampered) in e and "sha256" in e for e in errors)
    assert any("bundles.classification" in e and "segmentation model" in e for e in errors)
    assert any("no bundle role 'detector'" in e for e in errors)
    assert all(e.startswith("pipeline 'chest'") for e in errors)


def test_missing_required_role_and_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bundles\.segmentation is required"):
        registry.check_pipeline(PipelineSettings("p", {"classification": CLS}))
    with pytest.raises(ConfigError, match=r"bundles.segmentation = .*lesion-segg.*no card.json"):
        registry.check_pipeline(
            PipelineSettings("p", {"segmentation": builtin_bundle("lesion-segg")})
        )


def test_classification_kind_writes_an_sr_without_a_seg(tmp_path: Path) -> None:
    files = phantom_series(tmp_path)
    settings = PipelineSettings("triage", {"classification": CLS}, kind="classification")
    processor = Processor(Config(pipelines=(settings,)))
    series = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    out = processor.process_series(
        files, "triage", result_files(tmp_path / "out", series, "triage"), "seed"
    )
    assert out.segmentation is None and out.files == [out.report]
    assert not result_files(tmp_path / "out", series, "triage").segmentation.exists()
    sr = dcmread(out.report)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    (classification,) = out.summary["classifications"]
    assert classification["label"] == "lesion" and classification["positive"]
    report = run_dciodvfy(out.report)
    assert report.ok, report.errors


def test_worked_example_from_the_docs_runs_through_the_node(
    example_installed: None, tmp_path: Path
) -> None:
    """docs/pipelines.md: an installed package registers a kind; the node's processor
    runs it by name and writes a SEG and SR that pass dciodvfy."""
    assert "hu-threshold" in registry.pipeline_kinds()
    files = phantom_series(tmp_path, slices=20)
    settings = PipelineSettings("bones", {}, kind="hu-threshold")
    processor = Processor(Config(pipelines=(settings,)))
    series = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    out = processor.process_series(
        files, "bones", result_files(tmp_path / "out", series, "bones"), "seed"
    )
    assert out.segmentation is not None
    for path in out.files:
        report = run_dciodvfy(path)
        assert report.ok, (path.name, report.errors)
    # The spine of the phantom: a cylinder of radius 18 mm through all 20 slices of 2.5 mm
    spine = out.summary["findings"][0]
    expected = math.pi * 18.0**2 * 20 * 2.5
    assert spine["volume_mm3"] == pytest.approx(expected, rel=0.08)
    assert json.loads(json.dumps(out.summary))["algorithm"] == "hu-threshold 1.0.0"
