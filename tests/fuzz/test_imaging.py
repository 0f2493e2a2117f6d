"""What the job sees of accepted-but-broken instances: a clear ImagingError, nothing else.

The C-STORE handler accepts structurally sound instances whatever their values say (it
does not decode); the job's loader must then turn nonsense values and undecodable pixel
data into :class:`ImagingError` naming the file, never another exception, which the worker
would take for a crash (and, for a ``BaseException`` such as pyo3's PanicException raised
by the RLE decoder on corrupt input, one that ends the worker itself).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomnode.errors import ImagingError
from dicomnode.imaging.series import load_volume

from .harness import Seed, Tally, fuzz_settings, make_seeds, write_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PIXEL_DATA = 0x7FE00010
_ITEM = b"\xfe\xff\x00\xe0"
#: Attributes the loader reads (keyword: tag, VR).
READ = {
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "HighBit": (0x00280102, "US"),
    "PixelRepresentation": (0x00280103, "US"),
    "SamplesPerPixel": (0x00280002, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "PixelSpacing": (0x00280030, "DS"),
    "SliceThickness": (0x00180050, "DS"),
    "ImagePositionPatient": (0x00200032, "DS"),
    "ImageOrientationPatient": (0x00200037, "DS"),
    "RescaleSlope": (0x00281053, "DS"),
    "RescaleIntercept": (0x00281052, "DS"),
}


def _numbers(vm: int) -> st.SearchStrategy[bytes]:
    number = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-(10**12), 10**12).map(str),
        st.sampled_from(["", " ", "nan", "inf", "-0", "1e309", "0x10", "1,5", "++1"]),
    )
    return st.lists(number, min_size=0, max_size=vm + 2).map(lambda v: "\\".join(v).encode())


def _value(vr: str) -> st.SearchStrategy[bytes]:
    if vr == "US":
        return st.one_of(
            st.sampled_from([0, 1, 7, 8, 12, 15, 16, 17, 32, 64, 255, 65535]).map(
                lambda n: struct.pack("<H", n)
            ),
            st.binary(min_size=0, max_size=6).filter(lambda b: len(b) % 2 == 0),
        )
    if vr == "DS":
        return _numbers(6)
    if vr == "IS":
        return _numbers(1)
    return st.sampled_from([b"", b"MONOCHROME1 ", b"RGB ", b"YBR_FULL", b"PALETTE COLOR "])


def _padded(value: bytes) -> bytes:
    return value + b" " * (len(value) % 2)


def _undecodable(seed: Seed, fragment: bytes) -> bytes:
    value = _ITEM + struct.pack("<L", 0) + _ITEM + struct.pack("<L", len(fragment)) + fragment
    value += b"\xfe\xff\xdd\xe0" + b"\0" * 4
    header = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF)
    return seed.body[: seed.offset(PIXEL_DATA)] + header + value


@pytest.fixture(scope="module")
def series_seeds() -> list[Seed]:
    """Seeds whose series has a second, unchanged slice."""
    return make_seeds(slices=2)


def test_nonsense_values_and_undecodable_pixels_raise_imaging_error(
    series_seeds: list[Seed], tmp_path: Path, tally: Tally
) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    seeds = series_seeds
    for seed in seeds:
        seed.others[0].save_as(folder / f"other-{seed.name}.dcm", enforce_file_format=True)

    @fuzz_settings(max_examples=200)
    @given(seed=st.sampled_from(seeds), data=st.data())
    def case(seed: Seed, data: st.DataObject) -> None:
        # Given an instance with one attribute the loader reads set to nonsense, or
        # compressed pixel data whose fragment is random bytes
        if seed.encapsulated and data.draw(st.booleans(), label="garbage fragment"):
            fragment = _padded(data.draw(st.binary(min_size=2, max_size=2048)))
            body = _undecodable(seed, fragment)
            what = "fragment"
        else:
            keyword = data.draw(st.sampled_from(sorted(READ)), label="attribute")
            tag, vr = READ[keyword]
            value = _padded(data.draw(_value(vr), label="value"))
            body = seed.replace({tag: value}) if tag in {e.tag for e in seed.elements} else None
            if body is None:  # not in the seed: insert it in tag order
                body = _insert(seed, tag, vr, value)
            what = keyword
        path = write_instance(
            folder / "slice.dcm",
            body,
            sop_instance_uid=seed.sop_instance_uid,
            syntax=seed.transfer_syntax,
        )
        paths = [path]
        if data.draw(st.booleans(), label="with a second slice"):
            paths.append(folder / f"other-{seed.name}.dcm")
        # When the job's loader reads it (alone or with a valid slice of its series)
        try:
            volume = load_volume(paths)
        except ImagingError:
            tally.add("loader: nonsense values", f"{what}: ImagingError")
            return
        # Then it either raised ImagingError or built a finite, consistent volume
        tally.add("loader: nonsense values", f"{what}: loaded")
        assert volume.pixels.ndim == 3
        assert np.isfinite(volume.pixels).all()
        assert all(math.isfinite(v) and v > 0 for v in volume.pixel_spacing)
        assert math.isfinite(volume.slice_spacing) and volume.slice_spacing > 0

    case()


def _insert(seed: Seed, tag: int, vr: str, value: bytes) -> bytes:
    from .harness import element_bytes

    parts, placed = [], False
    for e in seed.elements:
        if not placed and e.tag > tag:
            parts.append(element_bytes(tag, vr, value, seed.implicit))
            placed = True
        parts.append(e.encoded)
    return b"".join(parts)
