"""Finding measurements on the source grid: volume, longest diameter, mean HU, centroid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label
from dicomnode.pipelines.lesion import longest_diameter_mm, measure_components

LABEL = Label(0, "Lesion", 0.5, Code("52988006", "SCT", "Lesion"))


Vector = tuple[float, float, float]
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
# An oblique frame (rows, columns, slices) with irrational components: no coordinate of a
# voxel centre is exact, and a single slice is flat only up to rounding.
_c, _s = math.cos(0.5), math.sin(0.5)
OBLIQUE = ((_c, _s, 0.0), (-_s * _c, _c * _c, _s), (_s * _s, -_c * _s, _c))


def volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float],
    dz: float,
    frame: tuple[Vector, Vector, Vector] = AXIAL,
) -> Volume:
    return Volume(
        pixels=np.full(shape, 40.0, dtype=np.float32),
        origin=(-120.5, 33.25, 911.0),
        row_direction=frame[0],
        column_direction=frame[1],
        slice_direction=frame[2],
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
    assert np.allclose(f.centroid_mm, (-100.5, 53.25, 941.0), atol=0.3)
    assert f.mean_hu == 40.0
    assert f.tracking_id == "Lesion 1"
    _, again = measure_components(vol, inside, LABEL, 1, min_volume_mm3=10.0, uid_seed="t")
    assert again[0].tracking_uid == f.tracking_uid  # stable across re-runs of the same job


def test_longest_diameter_of_two_points() -> None:
    pts = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    assert longest_diameter_mm(pts) == 5.0


def brute_force_diameter(points: np.ndarray) -> float:
    """Largest distance over all pairs of ``points``, the slow way (rows in chunks)."""
    best = 0.0
    for start in range(0, len(points), 256):
        d2 = ((points[start : start + 256, None, :] - points[None, :, :]) ** 2).sum(axis=-1)
        best = max(best, float(d2.max()))
    return math.sqrt(best)


def ellipsoid(
    shape: tuple[int, int, int], spacing: Vector, centre: Vector, axes: Vector
) -> np.ndarray:
    """Voxels (slice, row, column) whose centres lie in the ellipsoid; mm, (z, y, x)."""
    grid = np.indices(shape, dtype=np.float64)
    scaled = (grid * np.reshape(spacing, (3, 1, 1, 1)) - np.reshape(centre, (3, 1, 1, 1))) / (
        np.reshape(axes, (3, 1, 1, 1))
    )
    inside: np.ndarray = (scaled**2).sum(axis=0) <= 1.0
    return inside


def only_finding(vol: Volume, mask: np.ndarray) -> float:
    _, findings = measure_components(vol, mask, LABEL, 1, min_volume_mm3=0.0, uid_seed="t")
    assert len(findings) == 1
    return findings[0].longest_diameter_mm


def centres(vol: Volume, mask: np.ndarray) -> np.ndarray:
    return np.asarray(vol.voxel_to_patient(np.argwhere(mask)), dtype=np.float64)


@pytest.mark.parametrize("frame", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
def test_ellipsoid_diameter_is_the_largest_distance_between_its_voxel_centres(
    frame: tuple[Vector, Vector, Vector],
) -> None:
    # Given an ellipsoid voxelised on an anisotropic grid
    vol = volume((18, 30, 26), (0.6, 0.7), 1.0, frame)
    mask = ellipsoid((18, 30, 26), (1.0, 0.6, 0.7), (8.5, 9.0, 9.1), (7.0, 8.0, 6.0))
    # When its component is measured
    diameter = only_finding(vol, mask)
    # Then the diameter is exactly the largest distance between any two of its voxel
    # centres (the farthest pair is on the surface, which is what is measured)
    assert diameter == brute_force_diameter(centres(vol, mask))
    assert 15.0 < diameter <= 16.0 + 1e-9


def test_thin_rod_along_a_diagonal_has_its_length() -> None:
    # Given a one-voxel-wide rod of 400 voxels along the grid diagonal
    spacing = np.array([1.25, 0.7, 0.55])  # (z, y, x) mm
    k = np.arange(400, dtype=np.float64)[:, None]
    points = np.array([-120.5, 33.25, 911.0]) + k * spacing
    # When its diameter is computed
    diameter = longest_diameter_mm(points)
    # Then it is the rod's length between the end voxel centres
    assert math.isclose(diameter, 399 * math.sqrt(float((spacing**2).sum())), rel_tol=1e-12)
    assert diameter == brute_force_diameter(points)


@pytest.mark.parametrize("frame", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
def test_single_slice_disc_coplanar_points(frame: tuple[Vector, Vector, Vector]) -> None:
    # Given a lesion on one slice only: all its voxel centres lie in one plane
    vol = volume((3, 80, 80), (0.5, 0.5), 2.0, frame)
    mask = np.zeros((3, 80, 80), dtype=bool)
    mask[1] = ellipsoid((1, 80, 80), (1.0, 0.5, 0.5), (0.0, 20.0, 19.5), (1.0, 15.0, 15.0))[0]
    assert mask.sum() > 2000
    # When it is measured, Then the diameter is exact: about the disc's 30 mm
    diameter = only_finding(vol, mask)
    assert diameter == brute_force_diameter(centres(vol, mask))
    assert 29.0 < diameter <= 30.0 + 1e-9


def test_two_voxels_and_one_voxel() -> None:
    vol = volume((4, 6, 6), (0.8, 0.6), 1.5)
    two = np.zeros((4, 6, 6), dtype=bool)
    two[1, 2, 2] = two[2, 3, 3] = True  # diagonal neighbours: one 26-connected component
    assert math.isclose(only_finding(vol, two), math.sqrt(1.5**2 + 0.8**2 + 0.6**2))
    one = np.zeros((4, 6, 6), dtype=bool)
    one[2, 3, 3] = True
    assert only_finding(vol, one) == 0.0
    assert longest_diameter_mm(np.empty((0, 3))) == 0.0


def test_large_component_diameter_is_exact_where_sampling_was_not() -> None:
    # Given an oblique elongated ellipsoid with thousands of surface voxels
    shape = (40, 64, 64)
    vol = volume(shape, (0.7, 0.7), 1.0, OBLIQUE)
    mask = ellipsoid(shape, (1.0, 0.7, 0.7), (20.0, 22.0, 22.5), (14.0, 16.0, 18.0))
    surface = mask & ~ndimage.binary_erosion(mask)
    points = centres(vol, surface)
    assert len(points) > 3000
    # When its diameter is computed
    diameter = longest_diameter_mm(points)
    # Then it equals all-pairs brute force, which the old 3,000-point sample missed
    assert diameter == brute_force_diameter(points)
    sample = points[np.linspace(0, len(points) - 1, 3000).astype(np.intp)]
    assert brute_force_diameter(sample) < diameter
    assert only_finding(vol, mask) == diameter
