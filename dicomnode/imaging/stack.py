"""The geometry of one stack of frames: slice order, spacing, and what breaks a stack.

Slices are ordered by the projection of their position on the slice normal (the cross
product of the row and column directions of ImageOrientationPatient, PS3.3 C.7.6.2.1.1),
never by InstanceNumber, frame number or z, so any orientation and either slice order give
the same volume.  The slice spacing comes from the positions, not from SliceThickness.

A stack with two frames at one position, a missing slice (a step that is a multiple of
the others) or irregular steps is refused with a message naming the files on each side:
no slice is ever interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.errors import ImagingError
from dicomnode.imaging.headers import FrameHeader, format_mm, format_numbers

#: Largest difference tolerated between direction cosines of different slices.
ORIENTATION_TOLERANCE = 1e-4
#: Absolute tolerance (mm) on positions and spacings; the relative one is 1 %.
POSITION_TOLERANCE_MM = 0.01
SPACING_RELATIVE_TOLERANCE = 0.01
_OBLIQUE_COSINE = math.cos(math.radians(1.0))


@dataclass(frozen=True, eq=False)
class StackGeometry:
    """Where the frames of a stack go: ``order[k]`` is the frame at slice ``k``."""

    order: npt.NDArray[np.intp]
    origin: npt.NDArray[np.float64]
    slice_direction: npt.NDArray[np.float64]
    slice_spacing: float


def slice_normal(orientation: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    normal = np.cross(orientation[:3], orientation[3:])
    result: npt.NDArray[np.float64] = normal / np.linalg.norm(normal)
    return result


def same_orientation(a: FrameHeader, b: FrameHeader) -> bool:
    return bool(np.max(np.abs(a.orientation - b.orientation)) <= ORIENTATION_TOLERANCE)


def same_pixel_spacing(a: FrameHeader, b: FrameHeader) -> bool:
    pairs = zip(a.pixel_spacing, b.pixel_spacing, strict=True)
    return all(abs(x - y) <= max(1e-4, 1e-3 * y) for x, y in pairs)


def describe_orientation(orientation: npt.NDArray[np.float64]) -> str:
    """``axial``, ``coronal``, ``sagittal``, or ``oblique axial`` etc. beyond 1 degree."""
    normal = np.abs(slice_normal(orientation))
    axis = int(np.argmax(normal))
    name = ("sagittal", "coronal", "axial")[axis]
    return name if normal[axis] >= _OBLIQUE_COSINE else f"oblique {name}"


def check_consistent(headers: Sequence[FrameHeader]) -> None:
    """All frames share size, orientation, pixel spacing, series and frame of reference."""
    first = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise ImagingError(
                f"mixed Rows/Columns in one series: {first.rows}x{first.columns} in "
                f"{first.label}, {h.rows}x{h.columns} in {h.label}"
            )
        if not same_orientation(h, first):
            raise ImagingError(
                f"mixed ImageOrientationPatient in one series: "
                f"{format_numbers(first.orientation)} in {first.label}, "
                f"{format_numbers(h.orientation)} in {h.label}"
            )
        if not same_pixel_spacing(h, first):
            raise ImagingError(
                f"mixed PixelSpacing in one series: {format_numbers(first.pixel_spacing)} in "
                f"{first.label}, {format_numbers(h.pixel_spacing)} in {h.label}"
            )
        for name in ("series_instance_uid", "frame_of_reference_uid"):
            if getattr(h.instance, name) != getattr(first.instance, name):
                raise ImagingError(
                    f"mixed {name} in one series: {getattr(first.instance, name)!r} in "
                    f"{first.label}, {getattr(h.instance, name)!r} in {h.label}"
                )


def distances_along_normal(headers: Sequence[FrameHeader]) -> npt.NDArray[np.float64]:
    """Signed distance (mm) of each frame's position along the first frame's normal."""
    normal = slice_normal(headers[0].orientation)
    positions = np.stack([h.position for h in headers])
    result: npt.NDArray[np.float64] = positions @ normal
    return result


def position_multiplicity(headers: Sequence[FrameHeader]) -> int:
    """The largest number of frames that share one position along the normal."""
    if len(headers) < 2:
        return len(headers)
    distances = np.sort(distances_along_normal(headers))
    same = np.diff(distances) <= POSITION_TOLERANCE_MM
    best = run = 1
    for flag in same:
        run = run + 1 if flag else 1
        best = max(best, run)
    return best


def first_duplicate(headers: Sequence[FrameHeader]) -> tuple[FrameHeader, FrameHeader] | None:
    """Two frames at the same position along the normal (in slice order), or None."""
    if len(headers) < 2:
        return None
    distances = distances_along_normal(headers)
    order = np.argsort(distances, kind="stable")
    hits = np.flatnonzero(np.diff(distances[order]) <= POSITION_TOLERANCE_MM)
    if len(hits) == 0:
        return None
    i = int(hits[0])
    return headers[order[i]], headers[order[i + 1]]


def stack_geometry(headers: Sequence[FrameHeader]) -> StackGeometry:
    """Sort along the normal and check that the positions form one regular stack.

    Raises
    ------
    ImagingError
        On two frames at one position, a missing slice (naming the gap and the files on
        each side), irregular steps, or a lone slice without SliceThickness.
    """
    first = headers[0]
    normal = slice_normal(first.orientation)
    if len(headers) == 1:
        thickness = first.slice_thickness
        if thickness is None or not (math.isfinite(thickness) and thickness > 0):
            raise ImagingError(
                f"{first.label}: a single slice needs a positive SliceThickness to give the "
                "volume a slice spacing"
            )
        return StackGeometry(np.zeros(1, dtype=np.intp), first.position, normal, thickness)
    duplicate = first_duplicate(headers)
    if duplicate is not None:
        a, b = duplicate
        raise ImagingError(
            f"duplicate slice position {format_mm(a.position)} mm in {a.label} and {b.label}; "
            "split the series (e.g. by phase or acquisition) before loading"
        )
    positions = np.stack([h.position for h in headers])
    order = np.argsort(positions @ normal, kind="stable")
    sorted_positions = positions[order]
    steps = np.diff(sorted_positions, axis=0)
    mean_step = (sorted_positions[-1] - sorted_positions[0]) / (len(headers) - 1)
    spacing = float(np.linalg.norm(mean_step))
    if not math.isfinite(spacing):
        raise ImagingError(
            f"slice positions {format_mm(sorted_positions[0])} to "
            f"{format_mm(sorted_positions[-1])} mm are too far apart to be one series"
        )
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * spacing)
    deviations = np.linalg.norm(steps - mean_step, axis=1)
    if float(deviations.max()) > tolerance:
        ordered = [headers[i] for i in order]
        raise ImagingError(_irregular_message(ordered, np.linalg.norm(steps, axis=1)))
    return StackGeometry(order, sorted_positions[0], mean_step / spacing, spacing)


def _irregular_message(ordered: Sequence[FrameHeader], lengths: npt.NDArray[np.float64]) -> str:
    """A gap (steps that are whole multiples of the shortest) or irregular spacing."""
    shortest = float(lengths.min())
    multiples = np.rint(lengths / shortest)
    if np.all(np.abs(lengths - multiples * shortest) <= 0.1 * shortest) and multiples.max() > 1:
        gaps = np.flatnonzero(multiples > 1)
        i = int(gaps[0])
        missing = int(multiples[gaps].sum()) - len(gaps)
        where = f" in {len(gaps)} gaps" if len(gaps) > 1 else ""
        a, b = ordered[i], ordered[i + 1]
        return (
            f"missing slice: {lengths[i]:.2f} mm between {a.label} at "
            f"{format_mm(a.position)} mm and {b.label} at {format_mm(b.position)} mm, where "
            f"the other slices are {shortest:.2f} mm apart ({_slices(missing)} missing{where}); "
            "no slice is interpolated: send the complete series"
        )
    expected = float(np.median(lengths))
    worst = int(np.argmax(np.abs(lengths - expected)))
    a, b = ordered[worst], ordered[worst + 1]
    return (
        f"irregular slice spacing: step of {lengths[worst]:.3f} mm between {a.label} and "
        f"{b.label}, expected {expected:.3f} mm (overlapping acquisitions or varying spacing?)"
    )


def _slices(n: int) -> str:
    return f"{n} slice" if n == 1 else f"{n} slices"
