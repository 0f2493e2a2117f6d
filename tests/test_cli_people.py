"""The command line for people: descriptions, --version, one-line errors, tables, --json,
retry semantics, and batch with a manifest and a resume that checks hashes."""

from __future__ import annotations

import csv
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.app.batch import MANIFEST_CSV, MANIFEST_JSON, run_batch
from dicomnode.app.worker import WorkerContext
from dicomnode.cli import build_parser, main
from dicomnode.config import Config, FolderDestination, PipelineSettings, Route, load_config
from dicomnode.delivery.store import RetryRefusedError
from dicomnode.jobs.store import DONE, FAILED, QUEUED
from dicomnode.routing.rules import parse_rule
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom
from fixtures_models import max_classifier, threshold_segmenter


@pytest.fixture
def node_config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    return path


@pytest.fixture
def ctx(node_config: Path) -> WorkerContext:
    return WorkerContext.open(load_config(node_config))


def done_job(ctx: WorkerContext, tmp_path: Path) -> int:
    """A job whose one result file was delivered."""
    with ctx.jobs.db.transaction() as conn:
        job_id = ctx.jobs.create(conn, "1.2.3", "ct", 1, ["1.2.3.4"], ["out"])
    assert job_id is not None and ctx.jobs.claim() is not None
    result = tmp_path / "data" / "results" / f"job-{job_id}" / "a-ct-sr.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"sr")
    ctx.outbox.accept_results(job_id, [("out", result)], "{}")
    (item,) = ctx.outbox.take_due("out")
    ctx.outbox.delivered(item.id, 0)
    assert ctx.jobs.get(job_id).state == DONE
    return job_id


def test_every_command_and_option_has_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert "receives studies from a PACS" in parser.description  # type: ignore[operator]
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        if command.add_help:
            assert command.description, name
            for action in command._actions:
                assert action.help, f"{name} {action.dest}"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("dicomnode ")
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "usage: dicomnode synth" in capsys.readouterr().out


def test_unknown_jobs_and_missing_ids_are_one_line_errors(
    node_config: Path, ctx: WorkerContext, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["show", "99"], ["retry", "99"], ["show"], ["retry"]):
        assert main(["jobs", *argv, "--config", str(node_config)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "--state", "bogus", "--config", str(node_config)])
    assert exit_.value.code == 2


def test_jobs_tables_json_and_retry_of_a_done_job(
    node_config: Path, ctx: WorkerContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = done_job(ctx, tmp_path)
    assert main(["jobs", "show", str(job_id), "--config", str(node_config)]) == 0
    out = capsys.readouterr().out
    assert "job 1" in out and "took" in out and "a-ct-sr.dcm" in out and "20" in out
    assert main(["jobs", "show", str(job_id), "--json", "--config", str(node_config)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["state"] == "done" and document["created_at"].startswith("20")
    assert document["outbox"][0]["state"] == "done"
    assert main(["jobs", "list", "--json", "--config", str(node_config)]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["jobs"] == {"done": 1}

    # A done job is not re-run unless forced
    assert main(["jobs", "retry", str(job_id), "--config", str(node_config)]) == 2
    assert "--force" in capsys.readouterr().err
    assert ctx.jobs.get(job_id).state == DONE
    assert main(["jobs", "retry", str(job_id), "--force", "--config", str(node_config)]) == 0
    assert ctx.jobs.get(job_id).state == QUEUED
    (item,) = ctx.outbox.items(job_id)
    assert item.state == "done"  # the record of the earlier delivery is kept

    # When the forced re-run fails, the job returns to done: what it delivered stands
    assert ctx.jobs.claim() is not None
    assert ctx.outbox.job_failed(job_id, "ModelError: gone", transient=False) == DONE
    job = ctx.jobs.get(job_id)
    assert job.state == DONE and "re-run failed" in job.last_error


def test_a_forced_rerun_sends_its_results_again(ctx: WorkerContext, tmp_path: Path) -> None:
    job_id = done_job(ctx, tmp_path)
    assert ctx.outbox.retry_job(job_id, force=True) == QUEUED
    assert ctx.jobs.claim() is not None
    (item,) = ctx.outbox.items(job_id)
    assert ctx.outbox.accept_results(job_id, [("out", item.path)], "{}") == "sending"
    assert [i.state for i in ctx.outbox.items(job_id)] == ["pending"]
    with pytest.raises(RetryRefusedError, match="in progress"):
        ctx.outbox.retry_job(job_id)


def test_a_failed_job_is_still_retried(ctx: WorkerContext) -> None:
    with ctx.jobs.db.transaction() as conn:
        job_id = ctx.jobs.create(conn, "1.2.3", "ct", 1, ["1.2.3.4"], ["out"])
    assert job_id is not None and ctx.jobs.claim() is not None
    assert ctx.outbox.job_failed(job_id, "ImagingError: gap", transient=False) == FAILED
    assert ctx.outbox.retry_job(job_id) == QUEUED


def test_a_busy_port_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "node.toml"
        config.write_text(
            f'[node]\ndata_dir = "{tmp_path / "data"}"\nbind_address = "127.0.0.1"\n'
            f"port = {port}\nworkers = 0\n[http]\nenabled = false\n"
        )
        assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1, err


def test_check_config_reports_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = -1\nbogus = 1\nae_title = "A_TITLE_FAR_TOO_LONG_X"\n')
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "node.port" in err and "node.bogus" in err and "node.ae_title" in err
    assert all(line.startswith("error: ") for line in err.splitlines())


# --- batch ---------------------------------------------------------------------------


@pytest.fixture
def batch_config(tmp_path: Path) -> Config:
    seg = threshold_segmenter(tmp_path / "seg")
    cls = max_classifier(tmp_path / "cls")
    rule = parse_rule([{"Modality": "CT", "instance_count": {"ge": 8}}])
    return Config(
        pipelines=(PipelineSettings("lesion", {"segmentation": seg, "classification": cls}),),
        routes=(Route("ct", "lesion", ("out",), rule),),
        folders=(FolderDestination("out", tmp_path / "out"),),
    )


@pytest.fixture
def batch_input(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "in"
    for i, slices in enumerate((10, 12)):
        write_phantom(
            generate_phantom(PhantomSpec(rows=64, columns=64, slices=slices, seed=i, lesions=())),
            root / f"patient{i}" / "ct",
        )
    yield root


def test_batch_writes_a_manifest_and_resume_checks_hashes(
    batch_config: Config, batch_input: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    summary = run_batch(batch_config, batch_input, out, progress=False)
    assert len(summary.done) == 2 and summary.ok
    manifest = json.loads((out / MANIFEST_JSON).read_text())["studies"]
    folders = sorted(entry["input_folder"] for entry in manifest.values())
    assert folders == ["patient0/ct", "patient1/ct"]
    rows = list(csv.DictReader((out / MANIFEST_CSV).open()))
    assert len(rows) == 2 and {r["input_folder"] for r in rows} == set(folders)
    assert all(r["report"].endswith("-sr.dcm") and r["findings"] == "0" for r in rows)

    # Given one output changed and one missing, a second run redoes those two studies only
    first, second = (manifest[uid]["outputs"] for uid in sorted(manifest))
    (out / first[0]["file"]).write_bytes(b"changed")
    (out / second[-1]["file"]).unlink()
    again = run_batch(batch_config, batch_input, out, progress=False)
    assert sorted(again.redone) == sorted(manifest) and not again.skipped
    third = run_batch(batch_config, batch_input, out, progress=False)
    assert sorted(third.skipped) == sorted(manifest)


def test_batch_of_a_missing_folder_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["batch", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "input folder" in err and "does not exist" in err and err.count("\n") == 1


def test_batch_progress_names_the_folder(
    batch_config: Config, batch_input: Path, tmp_path: Path
) -> None:
    import io

    stream = io.StringIO()
    run_batch(batch_config, batch_input, tmp_path / "results", stream)
    text = stream.getvalue()
    assert str(batch_input) in text and "2/2" in text and "studies/s" in text
