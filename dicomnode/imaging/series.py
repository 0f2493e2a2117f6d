"""Turn the instances of one series into a :class:`Volume`.

:func:`load_volume` first picks the stack to process (:func:`select_stack`, headers only:
non-images, localizers and other orientations or phases left out, gaps refused; see
:mod:`dicomnode.imaging.selection`), then reads and decodes its frames one instance at a
time straight into the preallocated volume: int16 (half the memory of float32) as long as
every rescaled value is an integer int16 holds, as CT's Hounsfield units are; float32
from the first frame that needs it on.  Classic single-frame series and
enhanced multi-frame images (Enhanced CT/MR, Legacy Converted Enhanced: geometry and
rescale from the functional groups) give the same volume for the same pixels and geometry.

Slices are ordered along the slice normal (:mod:`dicomnode.imaging.stack`), never by
InstanceNumber, frame number or z; the slice spacing comes from the positions.
:func:`volume_from_datasets` builds from datasets in memory and selects nothing: they must
be one regular stack.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.errors import ImagingError
from dicomnode.imaging.headers import FrameHeader, is_multiframe, read_frames
from dicomnode.imaging.pixels import Frame, iter_frames
from dicomnode.imaging.selection import UNREADABLE, StackChoice, read_header, select_stack
from dicomnode.imaging.stack import check_consistent, stack_geometry
from dicomnode.imaging.volume import Pixels, Volume

__all__ = [
    "StackChoice",
    "load_stack",
    "load_volume",
    "select_stack",
    "source_datasets",
    "volume_from_datasets",
]


def _permute_in_place(pixels: Pixels, order: npt.NDArray[np.intp]) -> None:
    """``pixels[:] = pixels[order]`` with one temporary slice instead of a full copy."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        saved = pixels[start].copy()
        j = start
        while True:
            done[j] = True
            source = int(order[j])
            if source == start:
                pixels[j] = saved
                break
            pixels[j] = pixels[source]
            j = source


def _label(index: int, ds: Dataset, paths: Sequence[Path]) -> str:
    if index < len(paths):
        return str(paths[index])
    return f"dataset {index} (SOPInstanceUID {ds.get('SOPInstanceUID', '?')})"


class _VolumeBuilder:
    """Collects frames one instance at a time into a preallocated array, then builds."""

    def __init__(self, count: int) -> None:
        if count == 0:
            raise ImagingError("cannot build a volume from an empty series")
        self.count = count
        self.headers: list[FrameHeader] = []
        self.pixels: Pixels | None = None

    def add(self, ds: Dataset, label: str, source: int, frames: Collection[int] = ()) -> None:
        """Add the frames ``frames`` of ``ds`` (all of them when empty)."""
        try:
            headers = read_frames(ds, label, source)
            if frames:
                wanted = set(frames)
                headers = [h for h in headers if h.frame in wanted]
                if len(headers) != len(wanted):
                    raise ImagingError(f"{label}: has no frame(s) {sorted(wanted)}")
            if len(self.headers) + len(headers) > self.count:
                raise ImagingError(f"{label}: more frames than the {self.count} expected")
            if self.pixels is None:
                shape = (self.count, headers[0].rows, headers[0].columns)
                self.pixels = np.empty(shape, dtype=np.int16)
            check_consistent([self.headers[0] if self.headers else headers[0], *headers])
            start = len(self.headers)
            for i, frame in enumerate(iter_frames(ds, headers)):
                self._store(start + i, frame)
        except ImagingError:
            raise
        except UNREADABLE as exc:
            # A value that breaks its VR or makes no sense (a US with two values, a DS
            # "0x10", an IS "nan") reached through pydicom: the file is unusable, say which.
            raise ImagingError(
                f"{label}: unreadable attribute value ({type(exc).__name__}: {exc})"
            ) from exc
        self.headers.extend(headers)

    def _store(self, index: int, frame: Frame) -> None:
        """``pixels[index] = frame``; the first frame int16 cannot hold exactly (a fraction,
        a value out of its range, NaN) turns the whole volume into float32, once."""
        assert self.pixels is not None
        if self.pixels.dtype == np.int16 and frame.dtype != np.int16:
            with np.errstate(invalid="ignore"):  # NaN or out of range: caught just below
                compact = frame.astype(np.int16)
            if np.array_equal(compact, frame):
                self.pixels[index] = compact
                return
            self.pixels = self.pixels.astype(np.float32)
        self.pixels[index] = frame

    def build(self, paths: Sequence[Path]) -> Volume:
        if self.pixels is None or len(self.headers) != self.count:
            raise ImagingError(f"expected {self.count} frames, got {len(self.headers)}")
        stack = stack_geometry(self.headers)
        _permute_in_place(self.pixels, stack.order)
        first = self.headers[0]
        ordered = [self.headers[i] for i in stack.order]
        return Volume(
            pixels=self.pixels,
            origin=_vec3(stack.origin),
            row_direction=_vec3(first.orientation[:3]),
            column_direction=_vec3(first.orientation[3:]),
            slice_direction=_vec3(stack.slice_direction),
            pixel_spacing=first.pixel_spacing,
            slice_spacing=stack.slice_spacing,
            study_instance_uid=first.instance.study_instance_uid,
            series_instance_uid=first.instance.series_instance_uid,
            frame_of_reference_uid=first.instance.frame_of_reference_uid,
            modality=first.instance.modality,
            sop_instance_uids=tuple(h.instance.sop_instance_uid for h in ordered),
            source_paths=tuple(paths[h.source] for h in ordered) if paths else (),
            source_frames=tuple(h.frame for h in ordered),
        )


def _vec3(v: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _frame_count(ds: Dataset, label: str) -> int:
    if not is_multiframe(ds):
        return 1
    try:
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except UNREADABLE as exc:
        raise ImagingError(f"{label}: NumberOfFrames is not a number") from exc
    if count < 1:
        raise ImagingError(f"{label}: NumberOfFrames must be positive, got {count}")
    return count


def volume_from_datasets(datasets: Sequence[Dataset], paths: Sequence[Path] = ()) -> Volume:
    """Build a :class:`Volume` from the datasets (with pixel data) of one stack.

    The datasets are single-frame slices or enhanced multi-frame images; nothing is left
    out.  ``paths``, when given, must match ``datasets`` one to one; they name the files in
    error messages and become ``Volume.source_paths`` (in slice order).

    Raises
    ------
    ImagingError
        If the datasets do not form one regular stack.
    """
    if paths and len(paths) != len(datasets):
        raise ImagingError(f"got {len(paths)} paths for {len(datasets)} datasets")
    labels = [_label(index, ds, paths) for index, ds in enumerate(datasets)]
    count = sum(_frame_count(ds, label) for ds, label in zip(datasets, labels, strict=True))
    builder = _VolumeBuilder(count)
    for index, ds in enumerate(datasets):
        builder.add(ds, labels[index], index)
    return builder.build(paths)


def load_stack(choice: StackChoice) -> Volume:
    """Read and decode the instances of ``choice`` into a :class:`Volume`.

    Files are read one at a time, so peak memory is the volume plus one dataset.  A choice
    without ``frames`` (made by hand) is selected again from its paths.

    Raises
    ------
    ImagingError
        If a file cannot be read or decoded, or its frames do not form the stack chosen.
    """
    if len(choice.frames) != len(choice.paths):
        choice = select_stack(choice.paths)
    count = sum(max(1, len(frames)) for frames in choice.frames)
    builder = _VolumeBuilder(count)
    known = len(choice.headers) == len(choice.paths)
    for index, (path, frames) in enumerate(zip(choice.paths, choice.frames, strict=True)):
        # The header read for the choice, its pixel data read from the file now; a choice
        # loaded before has given its pixel data back, so its file is read again.
        header = choice.headers[index] if known else None
        if header is not None and "PixelData" not in header:
            header = None
        try:
            ds = header if header is not None else pydicom.dcmread(path)
            builder.add(ds, str(path), index, frames)
        except (InvalidDicomError, OSError) as exc:
            raise ImagingError(f"{path}: not a readable DICOM file: {exc}") from exc
        except UNREADABLE as exc:
            raise ImagingError(f"{path}: unreadable file ({type(exc).__name__}: {exc})") from exc
        finally:
            if header is not None:
                del header.PixelData  # the header stays, not the pixels
    return builder.build(choice.paths)


def load_volume(paths: Sequence[Path]) -> Volume:
    """Read the files of one series and build the :class:`Volume` of its chosen stack.

    The same as ``load_stack(select_stack(paths))``; call those two to also get the
    :class:`StackChoice` (what was left out, in a sentence for people).

    Raises
    ------
    ImagingError
        If a file is not DICOM or cannot be decoded, nothing in the series can be a volume,
        or the chosen stack is not regular (a gap, frames at one position).
    """
    return load_stack(select_stack(paths))


def source_datasets(volume: Volume, known: Mapping[Path, Dataset] | None = None) -> list[Dataset]:
    """The headers of the volume's source instances, each once, in slice order.

    One dataset per slice for a single-frame series, the one instance of an enhanced
    image: what :func:`dicomnode.outputs.seg.build_segmentation` and
    :func:`dicomnode.outputs.sr.build_measurement_report` take as ``source_datasets``.
    ``known`` maps paths to headers already read (a :class:`StackChoice`'s ``headers``);
    the others are read from their files.

    Raises
    ------
    ImagingError
        If the volume was built without paths, or a file cannot be read.
    """
    if not volume.source_paths:
        raise ImagingError("the volume has no source paths (it was built from datasets)")
    known = known or {}
    return [
        known[path] if path in known else read_header(path)
        for path in dict.fromkeys(volume.source_paths)
    ]
