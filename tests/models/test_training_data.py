"""Training data from DICOM: SEG-to-series pairing and label masks on the series grid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.models.data import load_case, load_cases, read_label_mask, scan_folder
from dicomnode.models.recipe import load_recipe
from dicomnode.models.synthetic import build_segmentation, write_case
from dicomnode.synthetic.phantom import Lesion, generate_phantom, write_phantom

LABELS = load_recipe("lesion_seg").labels
LESION = Lesion(center_mm=(70.0, -5.0, 0.0), radius_mm=14.0, hu=40.0)


def test_pairs_by_referenced_series_and_skips_unlabelled(
    tmp_path: Path, make_spec: Callable[..., Any]
) -> None:
    # Given one labelled case and one series without a SEG
    write_case(generate_phantom(make_spec(0, (LESION,))), tmp_path / "a")
    write_phantom(generate_phantom(make_spec(1)), tmp_path / "b" / "CT")
    (tmp_path / "notes.txt").write_text("not DICOM")
    # when the folder is scanned, then both series are found, only one with a label
    refs = scan_folder(tmp_path)
    assert [r.seg_path is not None for r in refs] == [True, False]
    assert refs[0].case_id == "a/CT" and len(refs[0].image_paths) == 8
    # and loading keeps only labelled cases unless told otherwise.
    assert len(load_cases(tmp_path, LABELS)) == 1
    assert len(load_cases(tmp_path, LABELS, unlabelled="negative")) == 2


def test_pairs_through_source_instances_without_referenced_series(
    tmp_path: Path, make_spec: Callable[..., Any]
) -> None:
    phantom = generate_phantom(make_spec(2, (LESION,)))
    write_phantom(phantom, tmp_path / "CT")
    seg = build_segmentation(phantom)
    del seg.ReferencedSeriesSequence
    seg.save_as(tmp_path / "seg.dcm")
    (ref,) = scan_folder(tmp_path)
    assert ref.seg_path == tmp_path / "seg.dcm"


def test_latest_segmentation_wins(tmp_path: Path, make_spec: Callable[..., Any]) -> None:
    phantom = generate_phantom(make_spec(3, (LESION,)))
    write_phantom(phantom, tmp_path / "CT")
    for name, time in (("old.dcm", "080000"), ("new.dcm", "170000"), ("mid.dcm", "120000")):
        seg = build_segmentation(phantom)
        seg.ContentDate, seg.ContentTime = "20240115", time
        seg.save_as(tmp_path / name)
    (ref,) = scan_folder(tmp_path)
    assert ref.seg_path == tmp_path / "new.dcm"


def test_mask_lands_on_the_volume_grid_for_any_orientation(
    tmp_path: Path, make_spec: Callable[..., Any]
) -> None:
    lesion = Lesion(center_mm=(70.0, 0.0, 0.0), radius_mm=14.0, hu=40.0)
    for i, orientation in enumerate(("coronal", "oblique")):
        # Given a phantom whose instances run against the slice normal
        phantom = generate_phantom(
            make_spec(
                4 + i,
                (lesion,),
                orientation=orientation,
                reverse_order=True,
                slices=10,
                slice_thickness=4.0,
            )
        )
        write_case(phantom, tmp_path / orientation)
        (ref,) = scan_folder(tmp_path / orientation)
        # when the case is loaded, then image and mask are both in slice-normal order
        case = load_case(ref, LABELS)
        assert phantom.mask.any()
        np.testing.assert_array_equal(case.hu, phantom.hu[::-1])
        np.testing.assert_array_equal(case.mask[..., 0], phantom.mask[::-1])
        # and the SEG read against any instance order follows that order.
        uids = [str(ds.SOPInstanceUID) for ds in phantom.datasets]
        direct = read_label_mask(ref.seg_path, uids, LABELS)
        np.testing.assert_array_equal(direct[..., 0], phantom.mask)


def test_soft_labels_hold_partial_coverage_and_threshold_to_the_hard_ones() -> None:
    # Given a disc of radius 7 px on a 0.6 mm grid, resampled to 1.4 mm
    import dataclasses

    from dicomnode.inference.preprocess import prepare_labels
    from dicomnode.models.data import soft_labels

    spec = dataclasses.replace(load_recipe("lesion_seg").preprocessing, target_spacing_mm=1.4)
    yy, xx = np.mgrid[:64, :64]
    mask = ((yy - 30.3) ** 2 + (xx - 33.6) ** 2 <= 7.0**2)[None]
    # when the labels are made soft and hard
    soft = soft_labels(mask, (0.6, 0.6), spec)
    hard = prepare_labels(mask, (0.6, 0.6), spec)
    # then the soft label lies in 0..1 with partial values on the edge, and is the hard one
    # before its threshold
    assert soft.shape == hard.shape and soft.min() >= 0.0 and soft.max() <= 1.0
    assert np.sum((soft > 0.05) & (soft < 0.95)) >= 8
    np.testing.assert_array_equal(soft >= 0.5, hard > 0)


def test_lesion_sampling_centres_small_lesions_as_often_as_large_ones() -> None:
    # Given one case with a large lesion (1200 voxels) and a tiny one (4 voxels) far apart
    from dicomnode.models.data import PatchSampler, PreparedCase, lesion_voxels

    label = np.zeros((3, 96, 96, 1), np.float32)
    label[:, 5:25, 5:25] = 1.0
    label[1, 80:82, 80:82] = 1.0
    case = PreparedCase("c", np.zeros((3, 96, 96), np.float32), label, 1.0)
    assert [len(v) for _, v in lesion_voxels([case])] == [1200, 4]

    def tiny_share(mode: str) -> float:
        sampler = PatchSampler(
            [case],
            task="segmentation",
            patch_size=16,
            context=1,
            positive_fraction=1.0,
            min_area_mm2=0.0,
            fill=0.0,
            positive_sampling=mode,
        )
        rng = np.random.default_rng(5)
        draws = [sampler.sample(rng)[1] for _ in range(400)]
        return float(np.mean([y.sum() in (1.0, 2.0, 4.0) for y in draws]))

    # when patches are centred by voxel or by lesion, then only "lesion" finds the tiny one
    assert tiny_share("voxel") < 0.05
    assert 0.35 < tiny_share("lesion") < 0.65
