"""Which instances of a series make its volume: series hygiene as a viewer does it.

A series as a PACS sends it is not always one stack of slices.  :func:`select_stack`
reads the headers only and picks the stack to process, by these rules:

1. Instances that cannot be slices are left out: non-images (SR, SEG, KOS, presentation
   states, RT, encapsulated documents: any SOP class that is no image storage class),
   localizers (ImageType value 3 LOCALIZER), colour images and images without patient
   geometry.
2. The frames left are grouped into stacks of one orientation, image size, pixel spacing
   and frame of reference; a multi-frame instance is never mixed with other instances.
3. Phases: where a group has several frames at one position, it is split by the first
   attribute of :data:`~dicomnode.imaging.headers.PHASE_ATTRIBUTES`
   (TemporalPositionIdentifier, AcquisitionNumber, EchoNumbers, TriggerTime ..., then
   pairs of them) that splits it into exactly as many stacks as there are frames at the
   busiest position, none with two frames at one position.  When no attribute does, the
   series fails with a message naming the files and their values.
4. The largest stack wins; on a tie, the one holding the lowest InstanceNumber (then the
   lowest frame number, then the first file).  What was left out is counted by reason
   in :attr:`StackChoice.left_out` and told in one sentence in :attr:`StackChoice.note`.
5. Gaps: the chosen stack must be complete.  A missing slice (a step that is a whole
   multiple of the others) fails the series with a message naming the gap in mm and the
   files on each side; the stack is never split at the gap nor interpolated, because a
   volume with part of the anatomy missing would give measurements that look complete.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.errors import ImagingError
from dicomnode.imaging.headers import (
    PHASE_ATTRIBUTES,
    FrameHeader,
    format_numbers,
    left_out_reason,
    read_frames,
)
from dicomnode.imaging.stack import (
    describe_orientation,
    distances_along_normal,
    first_duplicate,
    position_multiplicity,
    same_orientation,
    same_pixel_spacing,
    stack_geometry,
)

#: Reasons a stack is left out besides those of :func:`~dicomnode.imaging.headers.left_out_reason`.
OTHER_ORIENTATION = "in another orientation"
OTHER_SIZE = "of another size"
OTHER_SPACING = "with another pixel spacing"
OTHER_FRAME_OF_REFERENCE = "in another frame of reference"
OTHER_INSTANCE = "in another instance"
OTHER_PHASE = "in another phase"

#: What pydicom and the conversions raise on values that make no sense for their attribute.
UNREADABLE = (
    TypeError,
    ValueError,
    KeyError,
    AttributeError,
    IndexError,
    OverflowError,
    MemoryError,
)


@dataclass(frozen=True)
class StackChoice:
    """The stack of a series to build the volume from.

    ``paths``: the instances to build it from, in slice order.  ``note``: "" when the
    series was one clean stack, else one sentence saying what was left out and what was
    processed.  ``left_out``: (reason, count) pairs.  ``frames``: for each path, the
    1-based frame numbers taken from a multi-frame instance, in slice order; () for a
    single-frame instance (and when not known: :func:`load_stack` then selects again).
    ``headers``: for each path, its header as read for the choice, so that neither loading
    nor the SEG and SR read it again; () when not known.  Its pixel data is read from the
    file when used (:data:`DEFER_BYTES`); :func:`load_stack` removes it once loaded.
    """

    paths: tuple[Path, ...]
    note: str
    left_out: tuple[tuple[str, int], ...]
    frames: tuple[tuple[int, ...], ...] = ()
    headers: tuple[Dataset, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class _LeftOut:
    reason: str
    detail: str
    count: int
    example: str  # a file, for an error message


@dataclass(frozen=True)
class _Candidate:
    frames: list[FrameHeader]
    group: int
    phase: str  # "AcquisitionNumber 2"; "" when the group was not split
    error: str | None = None

    def rank(self) -> tuple[int, float, int, int]:
        first = min(
            (
                (
                    float("inf")
                    if h.instance.instance_number is None
                    else h.instance.instance_number,
                    h.frame,
                    h.source,
                )
                for h in self.frames
            ),
        )
        return (-len(self.frames), *first)


#: Values at least this long are read when first used, not with the header: the pixel
#: data of the chosen stack, read by :func:`~dicomnode.imaging.series.load_stack` from
#: where the header read found it, so that no file is parsed twice.
DEFER_BYTES = 64 * 1024


def read_header(path: Path, *, defer_pixels: bool = False) -> Dataset:
    """The header of ``path``: no pixel data, or (``defer_pixels``) pixel data and other
    long values left in the file until used (``DEFER_BYTES``)."""
    try:
        if defer_pixels:
            return pydicom.dcmread(path, defer_size=DEFER_BYTES)
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError) as exc:
        raise ImagingError(f"{path}: not a readable DICOM file: {exc}") from exc
    except UNREADABLE as exc:
        raise ImagingError(f"{path}: unreadable header ({type(exc).__name__}: {exc})") from exc


def prefetch(paths: Sequence[Path]) -> None:
    """Ask the kernel to start reading ``paths`` into memory now (``POSIX_FADV_WILLNEED``),
    so that reading them one by one overlaps the disk's work: the node writes received
    instances past the page cache (:func:`dicomnode.fsutil.write_direct`), so a study's
    files are on the disk, not in memory, when its job starts.  Does nothing where the
    call is missing or fails (the reads then wait for the disk)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # reported when read
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def select_stack(paths: Sequence[Path]) -> StackChoice:
    """Pick the stack of the series to build the volume from (see the module docstring).

    Reads headers only: the pixel data stays in the files until :func:`load_stack` reads
    it through the headers kept in the choice.

    Raises
    ------
    ImagingError
        When a file is not readable DICOM, when nothing processable remains (naming why),
        or when the chosen stack has a gap, irregular steps, or frames at one position
        that no attribute tells apart.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ImagingError("cannot build a volume from an empty series")
    prefetch(paths)
    frames: list[FrameHeader] = []
    left: list[_LeftOut] = []
    headers: list[Dataset] = []
    for index, path in enumerate(paths):
        ds = read_header(path, defer_pixels=True)
        headers.append(ds)
        try:
            reason = left_out_reason(ds)
            if reason is not None:
                left.append(_LeftOut(reason[0], reason[1], 1, str(path)))
                continue
            frames.extend(read_frames(ds, str(path), index))
        except ImagingError:
            raise
        except UNREADABLE as exc:
            raise ImagingError(
                f"{path}: unreadable attribute value ({type(exc).__name__}: {exc})"
            ) from exc
    if not frames:
        raise ImagingError(
            "no instance of the series can be a slice of a volume: "
            + "; ".join(f"{p}, e.g. {e}" for p, e in _phrases(left, with_example=True))
        )
    _check_one_series(frames)
    total = len(frames) + sum(item.count for item in left)
    chosen, more, phase = _choose(frames)
    left.extend(more)
    geometry = stack_geometry(chosen)
    ordered = [chosen[i] for i in geometry.order]
    sources = list(dict.fromkeys(h.source for h in ordered))
    by_source = {s: tuple(h.frame for h in ordered if h.source == s and h.frame) for s in sources}
    note = ""
    if left:
        multiframe = any(h.frame for h in frames)
        unit = "frames" if multiframe else "instances"
        count = sum(item.count for item in left)
        kind = "frame" if multiframe else "image"
        orientation = describe_orientation(chosen[0].orientation)
        processed = f"the {len(chosen)}-{kind} {orientation} stack" + (
            f" ({phase})" if phase else ""
        )
        note = (
            f"{count} of {total} {unit} left out: "
            + ", ".join(p for p, _ in _phrases(left))
            + f"; {processed} was processed"
        )
    reasons: dict[str, int] = {}
    for item in left:
        reasons[item.reason] = reasons.get(item.reason, 0) + item.count
    return StackChoice(
        paths=tuple(paths[s] for s in sources),
        note=note,
        left_out=tuple(reasons.items()),
        frames=tuple(by_source[s] for s in sources),
        headers=tuple(headers[s] for s in sources),
    )


def _phrases(left: Sequence[_LeftOut], *, with_example: bool = False) -> list[tuple[str, str]]:
    """("2 in another orientation (coronal)", example file) per reason, in first-seen order."""
    counts: dict[str, int] = {}
    details: dict[str, list[str]] = {}
    examples: dict[str, str] = {}
    for item in left:
        counts[item.reason] = counts.get(item.reason, 0) + item.count
        seen = details.setdefault(item.reason, [])
        if item.detail and item.detail not in seen:
            seen.append(item.detail)
        examples.setdefault(item.reason, item.example)
    return [
        (
            f"{n} {reason}" + (f" ({', '.join(details[reason])})" if details[reason] else ""),
            examples[reason] if with_example else "",
        )
        for reason, n in counts.items()
    ]


def _check_one_series(frames: Sequence[FrameHeader]) -> None:
    first = frames[0]
    for h in frames:
        if h.instance.series_instance_uid != first.instance.series_instance_uid:
            raise ImagingError(
                f"instances of two series were given as one: SeriesInstanceUID "
                f"{first.instance.series_instance_uid} in {first.label}, "
                f"{h.instance.series_instance_uid} in {h.label}"
            )


def _geometry_groups(frames: Sequence[FrameHeader]) -> list[list[FrameHeader]]:
    """Frames of one orientation, size, pixel spacing, frame of reference (and instance,
    for multi-frame instances), in order of first appearance."""
    groups: list[list[FrameHeader]] = []
    for h in frames:
        key = _exact_key(h)
        for group in groups:
            first = group[0]
            if (
                _exact_key(first) == key
                and same_orientation(first, h)
                and same_pixel_spacing(first, h)
            ):
                group.append(h)
                break
        else:
            groups.append([h])
    return groups


def _exact_key(h: FrameHeader) -> tuple[str, str, int, int]:
    instance = h.instance.sop_instance_uid if h.frame else ""
    return (instance, h.instance.frame_of_reference_uid, h.rows, h.columns)


def _choose(
    frames: Sequence[FrameHeader],
) -> tuple[list[FrameHeader], list[_LeftOut], str]:
    """The largest stack, what else was left out, and the phase that picked it."""
    groups = _geometry_groups(frames)
    candidates: list[_Candidate] = []
    for index, group in enumerate(groups):
        stacks, error = _split_phases(group)
        if error is not None:
            candidates.append(_Candidate(group, index, "", error))
        else:
            candidates.extend(_Candidate(part, index, phase) for phase, part in stacks)
    best = min(candidates, key=_Candidate.rank)
    if best.error is not None:
        raise ImagingError(best.error)
    left = []
    for candidate in candidates:
        if candidate is best:
            continue
        if candidate.group == best.group:
            reason, detail = OTHER_PHASE, candidate.phase
        else:
            reason, detail = _difference(candidate.frames[0], best.frames[0])
        left.append(_LeftOut(reason, detail, len(candidate.frames), candidate.frames[0].label))
    return best.frames, left, best.phase


def _difference(other: FrameHeader, chosen: FrameHeader) -> tuple[str, str]:
    """How a stack left out differs from the chosen one: (reason, detail)."""
    if not same_orientation(other, chosen):
        return OTHER_ORIENTATION, describe_orientation(other.orientation)
    if (other.rows, other.columns) != (chosen.rows, chosen.columns):
        return OTHER_SIZE, f"{other.rows}x{other.columns}"
    if not same_pixel_spacing(other, chosen):
        return OTHER_SPACING, f"{format_numbers(other.pixel_spacing)} mm"
    if other.instance.frame_of_reference_uid != chosen.instance.frame_of_reference_uid:
        return OTHER_FRAME_OF_REFERENCE, ""
    return OTHER_INSTANCE, ""


def _split_phases(
    group: list[FrameHeader],
) -> tuple[list[tuple[str, list[FrameHeader]]], str | None]:
    """The group as stacks without two frames at one position: [(phase label, frames)].

    Returns an error message instead when no phase attribute (or pair of them) splits it.
    """
    busiest = position_multiplicity(group)
    if busiest == 1:
        return [("", group)], None
    varying = [
        keyword for keyword in PHASE_ATTRIBUTES if len({h.phase_value(keyword) for h in group}) > 1
    ]
    keys: list[tuple[str, ...]] = [(k,) for k in varying]
    keys += list(itertools.combinations(varying, 2))
    for key in keys:
        parts: dict[tuple[str | None, ...], list[FrameHeader]] = {}
        for h in group:
            parts.setdefault(tuple(h.phase_value(k) for k in key), []).append(h)
        if len(parts) == busiest and all(position_multiplicity(p) == 1 for p in parts.values()):
            return [(_phase_label(key, values), part) for values, part in parts.items()], None
    pair = first_duplicate(group)
    assert pair is not None
    a, b = pair
    distance = float(distances_along_normal([a])[0])
    values = "; ".join(
        f"{k} {a.phase_value(k) or 'absent'} and {b.phase_value(k) or 'absent'}"
        for k in PHASE_ATTRIBUTES
        if a.phase_value(k) is not None or b.phase_value(k) is not None
    )
    return [], (
        f"{len(group)} frames with up to {busiest} at one slice position (e.g. {a.label} and "
        f"{b.label}, both at {distance:.2f} mm along the slice normal"
        + (f": {values}" if values else "")
        + "), and no attribute among "
        + ", ".join(PHASE_ATTRIBUTES)
        + " splits them into stacks; split the series before sending it"
    )


def _phase_label(key: tuple[str, ...], values: tuple[str | None, ...]) -> str:
    return ", ".join(
        f"{k} {v if v is not None else 'absent'}" for k, v in zip(key, values, strict=True)
    )
