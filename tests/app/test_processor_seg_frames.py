"""A pipeline's omit_empty_frames reaches the SEG the processor writes."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from dicomnode.app.processor import Processor
from dicomnode.config import Config, PipelineSettings, builtin_bundle
from dicomnode.outputs.layout import result_files
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom


def test_a_pipeline_may_leave_empty_frames_out_of_its_seg(tmp_path: Path) -> None:
    # Given the shipped lesion pipeline configured to leave empty frames out
    settings = PipelineSettings(
        "lesion",
        {"segmentation": builtin_bundle("lesion-seg")},
        providers=("cpu",),
        omit_empty_frames=True,
    )
    processor = Processor(Config(pipelines=(settings,)))
    phantom = generate_phantom(PhantomSpec(slices=40, seed=21))
    files = write_phantom(phantom, tmp_path / "in")
    series = str(phantom.datasets[0].SeriesInstanceUID)

    # When a series with lesions on some slices is processed
    out = processor.process_series(
        files, "lesion", result_files(tmp_path / "out", series, "lesion"), uid_seed="frames"
    )

    # Then its SEG has frames for those slices only
    assert out.segmentation is not None
    frames = int(dcmread(out.segmentation, stop_before_pixels=True).NumberOfFrames)
    covered = int(phantom.mask.any(axis=(1, 2)).sum())
    assert 0 < frames < 40
    assert abs(frames - covered) <= 2  # the model's mask, not the truth: a slice either way
