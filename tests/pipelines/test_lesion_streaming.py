"""The lesion pipeline streams the volume in slabs and labels only around the mask: the
results are those of the whole-volume path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from dicomnode.config import builtin_bundle
from dicomnode.imaging.series import volume_from_datasets
from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label, load_bundle
from dicomnode.inference.runner import BundleRunner
from dicomnode.pipelines.lesion import LesionPipeline, measure_components
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom
from fixtures_models import max_classifier

LABEL = Label(0, "Lesion", 0.5, Code("52988006", "SCT", "Lesion"))


def phantom_volume(slices: int = 37) -> Volume:
    spec = PhantomSpec(rows=128, columns=128, slices=slices, seed=4, pixel_spacing=(2.5, 2.5))
    return volume_from_datasets(generate_phantom(spec).datasets)


def shipped(name: str) -> BundleRunner:
    return BundleRunner(load_bundle(builtin_bundle(name)), ("cpu",))


def test_masks_and_per_slice_probabilities_equal_the_whole_volume_path() -> None:
    # Given the shipped bundles and a phantom with lesions (int16 pixels)
    volume = phantom_volume()
    assert volume.pixels.dtype == np.int16
    pipeline = LesionPipeline(shipped("lesion-seg"), shipped("lesion-cls"))

    # When the pipeline streams it in slabs
    masks, per_slice = pipeline.infer(volume)

    # Then the masks are the whole volume's probabilities thresholded, and the classifier's
    # per-slice probabilities are the same bit for bit
    probs = pipeline.segmentation.predict_segmentation(volume.pixels, volume.pixel_spacing)
    label = pipeline.segmentation.card.labels[0]
    assert len(masks) == 1 and masks[0].any()
    np.testing.assert_array_equal(masks[0], probs[label.index] >= label.threshold)
    assert pipeline.classification is not None
    expected = pipeline.classification.predict_classification(volume.pixels, volume.pixel_spacing)
    np.testing.assert_array_equal(per_slice, expected)


def test_a_classifier_with_other_preprocessing_gets_its_own_slabs(tmp_path: Path) -> None:
    # Given a classifier whose window and spacing differ from the segmenter's
    volume = phantom_volume(21)
    classifier = BundleRunner(load_bundle(max_classifier(tmp_path / "c")), ("cpu",), batch_size=3)
    pipeline = LesionPipeline(shipped("lesion-seg"), classifier)

    # When streamed
    _, per_slice = pipeline.infer(volume)

    # Then its probabilities are those of its own whole-volume preprocessing
    expected = classifier.predict_classification(volume.pixels, volume.pixel_spacing)
    np.testing.assert_array_equal(per_slice, expected)


def test_labelling_around_the_mask_gives_the_components_of_the_whole_volume() -> None:
    # Given a mask with components of several sizes away from the volume's corner
    rng = np.random.default_rng(3)
    mask = np.zeros((30, 40, 50), dtype=bool)
    mask[8:20, 12:30, 20:45] = rng.random((12, 18, 25)) > 0.93
    volume = Volume(
        pixels=rng.integers(-50, 80, size=mask.shape).astype(np.int16),
        origin=(0.0, 0.0, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        slice_direction=(0.0, 0.0, 1.0),
        pixel_spacing=(1.0, 1.0),
        slice_spacing=1.0,
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        frame_of_reference_uid="1.2.4",
        modality="CT",
        sop_instance_uids=tuple(f"1.2.5.{i}" for i in range(mask.shape[0])),
    )

    # When small components are dropped and the rest measured
    cleaned, findings = measure_components(volume, mask, LABEL, 1, min_volume_mm3=4.0, uid_seed="s")

    # Then the kept voxels are those of the whole volume's labelling, largest first
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labelled.ravel())
    keep = sorted((i for i in range(1, count + 1) if sizes[i] >= 4), key=lambda i: -sizes[i])
    assert 2 < len(keep) < count
    np.testing.assert_array_equal(cleaned, np.isin(labelled, keep))
    assert [f.voxel_count for f in findings] == [int(sizes[i]) for i in keep]
    for finding, i in zip(findings, keep, strict=True):
        voxels = labelled == i
        assert finding.mean_hu == float(volume.pixels[voxels].astype(np.float32).mean())
        centroid = np.argwhere(voxels).mean(axis=0)
        np.testing.assert_allclose(finding.centroid_mm, centroid[::-1])
