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
