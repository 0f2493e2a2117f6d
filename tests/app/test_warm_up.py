"""The worker warms its pipelines up before the first job; the SEG and SR reuse the headers
read when the stack was chosen."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest

from dicomnode.app.processor import Processor
from dicomnode.config import Config, PipelineSettings, builtin_bundle
from dicomnode.imaging.series import load_stack, select_stack, source_datasets
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

LESION = PipelineSettings(
    "lesion",
    {
        "segmentation": builtin_bundle("lesion-seg"),
        "classification": builtin_bundle("lesion-cls"),
    },
    providers=("cpu",),
)


def test_warm_up_opens_every_pipeline_and_builds_a_seg_and_an_sr(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a processor with the shipped lesion pipeline
    processor = Processor(Config(pipelines=(LESION,)))

    # When it warms up
    with caplog.at_level(logging.INFO, logger="dicomnode.app.processor"):
        processor.warm_up()

    # Then the pipeline is open and ran through to the SEG and SR, with no warning
    assert "lesion" in processor._pipelines
    assert "pipeline lesion warmed up" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_pipeline_that_cannot_open_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a pipeline whose segmentation bundle is a classifier
    wrong = PipelineSettings("wrong", {"segmentation": builtin_bundle("lesion-cls")})
    processor = Processor(Config(pipelines=(wrong,)))

    # When it warms up, then the failure is a warning naming the pipeline
    with caplog.at_level(logging.WARNING, logger="dicomnode.app.processor"):
        processor.warm_up()
    assert "pipeline wrong: warm-up failed" in caplog.text


def test_headers_read_for_the_choice_are_the_sources_of_seg_and_sr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a series whose stack was chosen (headers read once)
    paths = write_phantom(generate_phantom(PhantomSpec(slices=8, seed=2)), tmp_path / "s")
    choice = select_stack(paths[::-1])
    volume = load_stack(choice)
    assert len(choice.headers) == len(choice.paths) == 8

    # When the source datasets are asked for with them, no file is read again
    reads: list[Path] = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda p, **kw: reads.append(p) or real(p, **kw))
    sources = source_datasets(volume, dict(zip(choice.paths, choice.headers, strict=True)))
    assert reads == []

    # Then they are the headers in slice order, as read from the files
    monkeypatch.undo()
    expected = source_datasets(volume)
    assert [ds.SOPInstanceUID for ds in sources] == list(volume.sop_instance_uids)
    assert sources == expected
