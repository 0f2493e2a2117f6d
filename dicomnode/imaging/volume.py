"""The :class:`Volume` type: pixel data of one series with its patient geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

#: A volume's pixel values: int16 where every value is an integer int16 holds (CT in
#: Hounsfield units), float32 otherwise.
Pixels = npt.NDArray[np.float32] | npt.NDArray[np.int16]


@dataclass(frozen=True)
class Volume:
    """A series as a 3D array in patient geometry (DICOM PS3.3 C.7.6.2).

    ``pixels`` has shape (slices, rows, columns), with the modality rescale applied
    (Hounsfield units for CT): int16 when every value is an integer that int16 holds,
    which halves the memory of a CT volume, float32 otherwise (:data:`Pixels`); the values
    are the same either way (``np.asarray(pixels, np.float32)``).  Slice ``k`` lies at
    ``origin + k * slice_spacing * slice_direction``; pixel (r, c) of a slice lies at
    ``position + c * pixel_spacing[1] * row_direction + r * pixel_spacing[0] *
    column_direction`` (the DICOM convention:
    ImageOrientationPatient[:3] is the row direction, along which the column index grows).
    ``sop_instance_uids``, ``source_paths`` and ``source_frames`` are in slice order, one
    per slice.  ``source_frames[k]`` is the 1-based frame number of slice ``k`` in its
    multi-frame (enhanced) instance, 0 for a single-frame instance; the instance's SOP
    Instance UID and path then repeat for each of its frames.  Empty when unknown (a volume
    made by hand): every slice is then a single-frame instance.
    """

    pixels: Pixels
    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    slice_direction: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    sop_instance_uids: tuple[str, ...]
    source_paths: tuple[Path, ...] = field(default=())
    source_frames: tuple[int, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, int, int]:
        s, r, c = self.pixels.shape
        return (int(s), int(r), int(c))

    @property
    def is_multiframe(self) -> bool:
        """True when the slices are frames of an enhanced multi-frame instance."""
        return any(self.source_frames)

    def frame_number(self, index: int) -> int:
        """Frame number of slice ``index`` in its instance (1-based), 0 for single-frame."""
        return self.source_frames[index] if self.source_frames else 0

    @property
    def voxel_volume_mm3(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing

    def slice_position(self, index: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``index``."""
        o = np.asarray(self.origin) + index * self.slice_spacing * np.asarray(self.slice_direction)
        return (float(o[0]), float(o[1]), float(o[2]))

    def voxel_to_patient(self, ijk: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (slice, row, column) indices, shape (..., 3), to patient mm coordinates."""
        idx = np.asarray(ijk, dtype=np.float64)
        k, r, c = idx[..., 0:1], idx[..., 1:2], idx[..., 2:3]
        points: npt.NDArray[np.float64] = (
            np.asarray(self.origin)
            + k * self.slice_spacing * np.asarray(self.slice_direction)
            + r * self.pixel_spacing[0] * np.asarray(self.column_direction)
            + c * self.pixel_spacing[1] * np.asarray(self.row_direction)
        )
        return points
