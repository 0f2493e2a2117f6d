"""The shipped lesion model through the node's own processing: SEG overlaps the truth.

Reversed slice order, non-square pixels and non-axial orientations must all land on the
phantom's lesions (LESSONS #5: flipped or shifted segmentations in viewers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app.demo import dice, read_seg_mask
from dicomnode.app.processor import Processor
from dicomnode.config import Config, PipelineSettings, builtin_bundle
from dicomnode.imaging.series import load_volume
from dicomnode.outputs.layout import result_files
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

CASES = {
    "axial": PhantomSpec(slices=40, seed=21),
    "reversed": PhantomSpec(slices=40, seed=22, reverse_order=True),
    "non-square pixels": PhantomSpec(slices=40, seed=23, pixel_spacing=(1.2, 1.6)),
    "coronal": PhantomSpec(slices=48, seed=24, orientation="coronal"),
    "oblique reversed": PhantomSpec(slices=40, seed=25, orientation="oblique", reverse_order=True),
}


@pytest.fixture(scope="module")
def processor() -> Processor:
    settings = PipelineSettings(
        "lesion", {"segmentation": builtin_bundle("lesion-seg")}, providers=("cpu",)
    )
    return Processor(Config(pipelines=(settings,)))


@pytest.mark.parametrize("name", list(CASES))
def test_segmentation_matches_ground_truth(name: str, processor: Processor, tmp_path: Path) -> None:
    # Given a phantom with lesions of known position and size
    phantom = generate_phantom(CASES[name])
    files = write_phantom(phantom, tmp_path / "in")
    # When the node's processing runs the shipped model on it
    target = result_files(tmp_path / "out", phantom.datasets[0].SeriesInstanceUID, "ct")
    out = processor.process_series(files, "lesion", target, uid_seed=name)
    assert out.segmentation is not None
    # Then the SEG, read back by source UID, overlaps the truth voxel for voxel
    volume = load_volume(files)
    mask = read_seg_mask(out.segmentation, list(volume.sop_instance_uids))
    order = {ds.SOPInstanceUID: k for k, ds in enumerate(phantom.datasets)}
    truth = phantom.mask[[order[u] for u in volume.sop_instance_uids]]
    score = dice(mask, truth)
    print(f"{name}: Dice {score:.3f}")
    assert score >= 0.95, name
    # And every lesion is found, as one finding each
    assert len(out.summary["findings"]) == len(phantom.lesions)
    assert dcmread(out.report).VerificationFlag == "UNVERIFIED"
