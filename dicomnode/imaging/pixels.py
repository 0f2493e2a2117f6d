"""Decode the frames of one instance into float32 slices, with the modality rescale.

Native little-endian 16-bit data is read straight from the buffer (pydicom's generic path
costs ~2 ms per 512 x 512 slice; this costs microseconds); everything else goes through
pydicom's decoders (the pylibjpeg plugins for compressed syntaxes), frame by frame for a
multi-frame instance, so peak memory stays one frame above the volume.
:func:`iter_frames` gives them one at a time in one float32 buffer, for the caller to
store as it likes (:mod:`dicomnode.imaging.series` keeps int16 where the values allow).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.errors import ImagingError
from dicomnode.imaging.headers import FrameHeader, plain

_NATIVE_LITTLE_ENDIAN = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1

#: A rescaled frame: exact int16 where the rescale allows, float32 otherwise.
Frame = npt.NDArray[np.int16] | npt.NDArray[np.float32]


def _native_pixels(ds: Dataset, index: int) -> npt.NDArray[np.integer] | None:
    """Stored values of frame ``index`` (0-based) of native little-endian 16-bit data.

    Returns None where the generic decoder is needed.
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = getattr(file_meta, "TransferSyntaxUID", None)
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if (
        syntax not in _NATIVE_LITTLE_ENDIAN
        or int(ds.get("BitsAllocated", 0) or 0) != 16
        or (signed and bits_stored != 16)
        or not 1 <= bits_stored <= 16
    ):
        return None
    count = int(ds.Rows) * int(ds.Columns)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < 2 * count * (index + 1):
        return None
    stored = np.frombuffer(
        data, dtype="<i2" if signed else "<u2", count=count, offset=2 * count * index
    )
    if not signed and bits_stored < 16:
        stored = stored & np.uint16((1 << bits_stored) - 1)  # bits above BitsStored are not pixel
    return stored.reshape(int(ds.Rows), int(ds.Columns))


def _decode_error(ds: Dataset, label: str, exc: BaseException) -> ImagingError:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
    return ImagingError(
        f"{label}: cannot decode pixel data (transfer syntax {syntax}): {type(exc).__name__}: {exc}"
    )


def _decoded(
    ds: Dataset, label: str, indices: Sequence[int] | None
) -> list[npt.NDArray[np.integer]]:
    """pydicom's decoders: the whole image (``indices`` None) or these frames."""
    try:
        if indices is None:
            return [ds.pixel_array]
        return list(iter_pixels(ds, indices=list(indices)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # decoders raise many types; name the file and syntax
        # pylibjpeg-rle (Rust, pyo3) panics on corrupt RLE with PanicException, which
        # derives from BaseException: uncaught, it would end the worker, not the job.
        raise _decode_error(ds, label, exc) from exc


def iter_frames(ds: Dataset, headers: Sequence[FrameHeader]) -> Iterator[Frame]:
    """The frames ``headers`` of ``ds``, rescaled, one at a time, in ``headers``' order.

    A frame whose rescale is an integer one (slope 1, whole intercept) into int16's range
    comes as int16, exact and without a trip through float32; any other as float32, in
    the same buffer, overwritten by the next frame: copy what is to be kept before asking
    for the next one.

    Raises
    ------
    ImagingError
        If the pixel data cannot be decoded or does not match Rows/Columns, or the rescale
        would overflow float32; the message names the file (and frame).
    """
    if "PixelData" not in ds:
        raise ImagingError(f"{headers[0].label}: missing PixelData")
    out = np.empty((headers[0].rows, headers[0].columns), dtype=np.float32)
    if headers[0].frame == 0:  # a single-frame image: its own rescale or Modality LUT
        stored = _native_pixels(ds, 0)
        if stored is None:
            stored = _decoded(ds, headers[0].label, None)[0]
        _check_shape(stored, out, headers[0].label)
        if "ModalityLUTSequence" in ds:
            out[...] = apply_modality_lut(stored, ds)
        else:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            yield _rescaled(stored, slope, intercept, headers[0].label, out)
            return
        yield out
        return
    native = [_native_pixels(ds, h.frame - 1) for h in headers]
    if any(a is None for a in native):
        native = list(_decoded(ds, headers[0].label, [h.frame - 1 for h in headers]))
    for header, stored in zip(headers, native, strict=True):
        assert stored is not None
        _check_shape(stored, out, header.label)
        slope, intercept = header.rescale or (1.0, 0.0)
        yield _rescaled(stored, slope, intercept, header.label, out)


def _check_shape(stored: npt.NDArray[np.integer], out: npt.NDArray[np.float32], label: str) -> None:
    if stored.shape != out.shape:
        raise ImagingError(
            f"{label}: pixel array {'x'.join(map(str, stored.shape))} does not match "
            f"Rows/Columns {'x'.join(map(str, out.shape))}"
        )


def _rescaled(
    stored: npt.NDArray[np.integer],
    slope: float,
    intercept: float,
    label: str,
    buffer: npt.NDArray[np.float32],
) -> Frame:
    """``stored * slope + intercept``: exact int16 where it can be, else in ``buffer``."""
    exact = _exact_int16(stored, slope, intercept)
    if exact is not None:
        return exact
    _rescale_into(stored, slope, intercept, label, buffer)
    return buffer


def _exact_int16(
    stored: npt.NDArray[np.integer], slope: float, intercept: float
) -> npt.NDArray[np.int16] | None:
    """``stored + intercept`` as int16 when slope is 1, the intercept whole and every value
    in int16's range (CT's Hounsfield units); None otherwise."""
    if slope != 1.0 or not intercept.is_integer() or stored.dtype.kind not in "iu":
        return None
    if stored.dtype.itemsize > 2:
        return None
    shift = int(intercept)
    low, high = int(stored.min()), int(stored.max())
    # Values above 32767 (unsigned) would wrap in the int16 copy before the shift.
    if high > INT16_MAX or low + shift < INT16_MIN or high + shift > INT16_MAX:
        return None
    out = stored.astype(np.int16)
    if shift:
        out += np.int16(shift)
    return out


def _rescale_into(
    stored: npt.NDArray[np.integer],
    slope: float,
    intercept: float,
    label: str,
    out: npt.NDArray[np.float32],
) -> None:
    # Rescaled values must be finite in float32 for every stored value the dtype can hold.
    largest = abs(slope) * 2.0 ** (8 * stored.dtype.itemsize) + abs(intercept)
    if not (math.isfinite(largest) and largest < _FLOAT32_MAX):
        raise ImagingError(
            f"{label}: RescaleSlope {plain(slope)} / RescaleIntercept {plain(intercept)} "
            "overflow float32"
        )
    out[...] = stored
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
