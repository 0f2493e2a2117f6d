"""Batch conversion and the command line, on real files with the fixture models."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app.batch import RESULT_FILE, run_batch
from dicomnode.cli import _source_date_epoch, _timestamp, main
from dicomnode.config import Config, FolderDestination, PipelineSettings, Route, load_config
from dicomnode.routing.rules import parse_rule
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom
from fixtures_models import max_classifier, threshold_segmenter

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    seg = threshold_segmenter(tmp_path / "seg")
    cls = max_classifier(tmp_path / "cls")
    rule = parse_rule([{"Modality": "CT", "instance_count": {"ge": 8}}])
    return Config(
        pipelines=(PipelineSettings("lesion", {"segmentation": seg, "classification": cls}),),
        routes=(Route("ct", "lesion", ("out",), rule),),
        folders=(FolderDestination("out", tmp_path / "out"),),
    )


def make_input(root: Path) -> None:
    for i, slices in enumerate((10, 12)):
        write_phantom(
            generate_phantom(PhantomSpec(rows=64, columns=64, slices=slices, seed=i, lesions=())),
            root / f"study{i}",
        )
    write_phantom(
        generate_phantom(PhantomSpec(rows=64, columns=64, slices=4, lesions=())), root / "too-short"
    )
    (root / "notes.txt").write_text("not DICOM")
    (root / "study0" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 10)


def test_batch_converts_resumes_and_reports(config: Config, tmp_path: Path) -> None:
    make_input(tmp_path / "in")
    summary = run_batch(config, tmp_path / "in", tmp_path / "out")
    assert len(summary.done) == 2 and len(summary.ignored) == 1 and summary.ok
    for study in summary.done:
        result = json.loads((tmp_path / "out" / study / RESULT_FILE).read_text())
        classes = sorted(
            str(dcmread(p).SOPClassUID) for p in (tmp_path / "out" / study).glob("*.dcm")
        )
        assert classes == [SEG_CLASS, SR_CLASS]
        (entry,) = result["results"]
        assert entry["route"] == "ct" and "findings" in entry
        assert entry["classifications"][0]["label"] == "Bright present"
    again = run_batch(config, tmp_path / "in", tmp_path / "out")
    assert sorted(again.skipped) == sorted(summary.done) and not again.done


def test_two_runs_with_one_creation_time_write_the_same_bytes(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_input(tmp_path / "in")
    created = datetime.datetime(2026, 12, 1, 8, 30, 15, 250000, tzinfo=datetime.UTC)
    # When the same input is converted three times: twice at one creation time (given as
    # SOURCE_DATE_EPOCH, then as --created-at through the command line's parser), once not
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(created.timestamp()))
    run_batch(config, tmp_path / "in", tmp_path / "a", created=_source_date_epoch())
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    run_batch(config, tmp_path / "in", tmp_path / "b", created=_timestamp(created.isoformat()))
    run_batch(config, tmp_path / "in", tmp_path / "c")

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.dcm")}

    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    # Then the first two are the same bytes, stamped with that time ...
    assert len(a) == 4 and a == b
    for data in a.values():
        ds = dcmread(io.BytesIO(data))
        assert (ds.InstanceCreationDate, ds.ContentDate) == ("20261201", "20261201")
        assert (ds.InstanceCreationTime, ds.ContentTime) == ("083015.250000", "083015.250000")
    # ... and the third differs only in its times (same UIDs, same pixels)
    assert sorted(c) == sorted(a) and all(c[name] != a[name] for name in a)
    for name in a:
        one, other = dcmread(io.BytesIO(a[name])), dcmread(io.BytesIO(c[name]))
        assert one.SOPInstanceUID == other.SOPInstanceUID
        dimension = [
            item.DimensionOrganizationUID for item in one.get("DimensionOrganizationSequence", [])
        ]
        assert dimension == [
            item.DimensionOrganizationUID for item in other.get("DimensionOrganizationSequence", [])
        ]
        if "PixelData" in one:
            assert one.PixelData == other.PixelData


def test_two_routes_on_one_series_keep_both_results(config: Config, tmp_path: Path) -> None:
    """Both routes' SEG and SR are kept: file names carry the route (they used to collide)."""
    second = dataclasses.replace(config.routes[0], name="ct-again")
    both = dataclasses.replace(config, routes=(*config.routes, second))
    make_input(tmp_path / "in")
    summary = run_batch(both, tmp_path / "in", tmp_path / "out")
    assert len(summary.done) == 2 and summary.ok
    for study in summary.done:
        folder = tmp_path / "out" / study
        result = json.loads((folder / RESULT_FILE).read_text())
        assert sorted(r["route"] for r in result["results"]) == ["ct", "ct-again"]
        files = sorted(p.name for p in folder.glob("*.dcm"))
        assert (
            len(files) == 4 and len({str(dcmread(folder / f).SOPInstanceUID) for f in files}) == 4
        )
        for entry in result["results"]:
            assert (folder / entry["seg"]).is_file() and (folder / entry["sr"]).is_file()
            assert entry["route"] in entry["seg"] and entry["route"] in entry["sr"]


def test_batch_failure_is_reported_and_exit_code_nonzero(
    config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_phantom(
        generate_phantom(PhantomSpec(rows=64, columns=64, slices=10, lesions=())), tmp_path / "in"
    )
    ds = dcmread(files[3])
    ds.ImagePositionPatient = dcmread(files[4]).ImagePositionPatient  # duplicate position
    ds.save_as(files[3])
    summary = run_batch(config, tmp_path / "in", tmp_path / "out")
    (reason,) = summary.failed.values()
    assert "ImagingError" in reason
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(f"""
[[folders]]
name = "out"
path = "{tmp_path / "o2"}"
[[pipelines]]
name = "lesion"
bundles.segmentation = "{config.pipelines[0].bundles["segmentation"]}"
[[routes]]
name = "ct"
pipeline = "lesion"
destinations = ["out"]
[[routes.match]]
Modality = "CT"
""")
    assert (
        main(["batch", str(tmp_path / "in"), str(tmp_path / "out2"), "--config", str(cfg_file)])
        == 1
    )
    assert "FAILED" in capsys.readouterr().out


def test_route_explain_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_phantom(
        generate_phantom(PhantomSpec(rows=32, columns=32, slices=5, lesions=())), tmp_path / "study"
    )
    assert main(["route", "explain", str(tmp_path / "study")]) == 0
    out = capsys.readouterr().out
    assert "no match" in out and "instance_count >= 20 fails" in out
    assert "would be recorded as ignored" in out


def test_check_config_reports_errors_with_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = -1\n")
    assert main(["check-config", str(bad)]) == 2
    assert "node.port" in capsys.readouterr().err


def test_jobs_command_lists_and_retries(
    config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicomnode.app.worker import WorkerContext

    data = tmp_path / "data"
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(f'[node]\ndata_dir = "{data}"\n')
    ctx = WorkerContext.open(load_config(cfg_file))
    with ctx.jobs.db.transaction() as conn:
        job_id = ctx.jobs.create(conn, "1.2.3", "ct", 1, ["1.2.3.4"], ["out"])
    ctx.jobs.claim()
    assert job_id is not None
    ctx.jobs.fail(job_id, "ImagingError: gap between slices", transient=False)
    assert main(["jobs", "--config", str(cfg_file)]) == 0
    assert "failed" in capsys.readouterr().out
    assert main(["jobs", "retry", str(job_id), "--config", str(cfg_file)]) == 0
    assert ctx.jobs.get(job_id).state == "queued"
