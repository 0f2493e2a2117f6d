"""Finding measurements on the source grid: volume, longest diameter, mean HU, centroid."""

from __future__ import annotations

import math

import numpy as np

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label
from dicomnode.pipelines.lesion import longest_diameter_mm, measure_components

LABEL = Label(0, "Lesion", 0.5, Code("52988006", "SCT", "Lesion"))


def volume(shape: tuple[int, int, int], spacing: tuple[float, float], dz: float) -> Volume:
    return Volume(
        pixels=np.full(shape, 40.0, dtype=np.float32),
        origin=(0.0, 0.0, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        slice_direction=(0.0, 0.0, 1.0),
        pixel_spacing=spacing,
        slice_spacing=dz,
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        frame_of_reference_uid="1.2.4",
        modality="CT",
        sop_instance_uids=tuple(f"1.2.5.{i}" for i in range(shape[0])),
    )


def test_sphere_volume_and_diameter_match_geometry_with_anisotropic_voxels() -> None:
    vol = volume((60, 80, 80), (0.5, 0.5), 1.0)
    k, r, c = np.mgrid[0:60, 0:80, 0:80]
    centre, radius = np.array([30.0, 20.0, 20.0]), 10.0  # mm (z, y, x)
    inside = (
        (k * 1.0 - centre[0]) ** 2 + (r * 0.5 - centre[1]) ** 2 + (c * 0.5 - centre[2]) ** 2
    ) <= radius**2
    small = np.zeros_like(inside)
    small[5, 70:72, 70:72] = True  # 4 voxels = 1 mm3: below the minimum, dropped
    mask, findings = measure_components(
        vol, inside | small, LABEL, 1, min_volume_mm3=10.0, uid_seed="t"
    )
    assert len(findings) == 1 and not mask[5].any()
    f = findings[0]
    assert abs(f.volume_mm3 - 4 / 3 * math.pi * radius**3) / (4 / 3 * math.pi * radius**3) < 0.03
    assert abs(f.longest_diameter_mm - 2 * radius) < 1.5
    assert np.allclose(f.centroid_mm, (20.0, 20.0, 30.0), atol=0.3)
    assert f.mean_hu == 40.0
    assert f.tracking_id == "Lesion 1"
    _, again = measure_components(vol, inside, LABEL, 1, min_volume_mm3=10.0, uid_seed="t")
    assert again[0].tracking_uid == f.tracking_uid  # stable across re-runs of the same job


def test_longest_diameter_of_two_points() -> None:
    pts = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    assert longest_diameter_mm(pts) == 5.0
