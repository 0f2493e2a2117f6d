"""The receive check sizes native pixel data by its Image Pixel module, for every layout.

:func:`read_header` refuses native Pixel Data shorter than its header declares.  The
expected length depends on more than Rows x Columns x Samples x Frames x Bits Allocated:
Bits Allocated 1 packs the frames bit by bit (PS3.5 8.1.1) and YBR_FULL_422 stores two
samples a pixel (PS3.3 C.7.6.3.1.2).  Every bundled pydicom test file with native pixel
data is accepted as it is; cut by a few bytes, it is refused with both lengths named.
Layouts no bundled file has (MONOCHROME1, native YBR_FULL, 16-bit YBR_FULL_422, multi-frame
1-bit, Float and Double Float Pixel Data) are made from bundled files.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.data.data_manager import DATA_ROOT
from pydicom.uid import ParametricMapStorage

from dicomnode.app.node import Node
from dicomnode.errors import InvalidInstanceError
from dicomnode.net import status
from dicomnode.net.scu import Peer, send_files
from dicomnode.spool.header import read_header

NodeFactory = Callable[..., Node]
#: The files the pydicom wheel ships (get_testdata_files would also try to download
#: pydicom-data's hundreds).
BUNDLED = Path(DATA_ROOT) / "test_files"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
IMAGE_PIXEL = ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
#: Bundled files with native pixel data refused for another, legitimate reason: the
#: message expected and the reason.
REFUSED = {
    "MR_truncated.dcm": (r"declares 8192 bytes but only 8130 remain", "file cut short"),
}


def _read(path: str | Path) -> Dataset:
    with warnings.catch_warnings():  # some bundled files are invalid on purpose (badVR.dcm)
        warnings.simplefilter("ignore")
        return dcmread(path, force=True)


def _native_files() -> list[Any]:
    """One param per bundled file with native pixel data, its layout in the id; those that
    are no valid image (no identifying UIDs, no Image Pixel module) are skipped, the reason
    in the id."""
    params = []
    for path in sorted(BUNDLED.glob("*.dcm")):
        with warnings.catch_warnings():  # some are invalid on purpose (badVR.dcm)
            warnings.simplefilter("ignore")
            try:
                ds = dcmread(path, force=True)
            except Exception:  # no DICOM file at all: nothing to check here
                continue
            syntax = ds.file_meta.get("TransferSyntaxUID")
            if not any(k in ds for k in PIXEL_KEYWORDS) or (syntax and syntax.is_compressed):
                continue
            missing = [k for k in (*IDENTIFYING, *IMAGE_PIXEL) if k not in ds]
            if missing or syntax is None:
                reason = "no valid image, lacks " + " ".join(missing or ["TransferSyntaxUID"])
                mark = pytest.mark.skip(reason)
                params.append(pytest.param(path.name, id=f"{path.name}[{reason}]", marks=mark))
                continue
            pi = str(ds.PhotometricInterpretation).replace(" ", "_")
            frames = ds.get("NumberOfFrames", 1)
            layout = f"{pi}-{ds.BitsAllocated}bit-{frames}frames-{syntax.name.replace(' ', '')}"
        if path.name in REFUSED:
            layout = f"refused, {REFUSED[path.name][1]}"
        params.append(pytest.param(path.name, id=f"{path.name}[{layout}]"))
    return params


NATIVE_FILES = _native_files()
CHECKED = [p.values[0] for p in NATIVE_FILES if not p.marks]


def _encoded(ds: Dataset) -> bytes:
    """Part 10 bytes (preamble, file meta, dataset) as a C-STORE handler gets them."""
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("name", NATIVE_FILES)
def test_bundled_native_files_are_accepted(name: str) -> None:
    # Given a bundled file with native pixel data, as its bytes
    encoded = (BUNDLED / name).read_bytes()
    if name in REFUSED:
        # When its header is checked, Then its legitimate fault is named
        with pytest.raises(InvalidInstanceError, match=REFUSED[name][0]):
            read_header(encoded)
        return
    # When its header is checked
    header = read_header(encoded)
    # Then it is accepted and its UIDs are read
    assert header.sop_instance_uid == str(_read(BUNDLED / name).SOPInstanceUID)


def test_all_layouts_are_among_the_bundled_files() -> None:
    """The parametrization above covers the layouts the check must size differently."""
    for expected in (
        "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422, 2 bytes a pixel
        "liver_1frame.dcm",  # Bits Allocated 1
        "examples_palette.dcm",  # PALETTE COLOR
        "examples_rgb_color.dcm",  # RGB
        "SC_rgb_small_odd.dcm",  # 27 bytes padded to 28
        "CT_small.dcm",  # 16-bit
        "rtdose.dcm",  # 32-bit, 15 frames
        "MR_small_implicit.dcm",  # implicit VR
        "liver_expb_1frame.dcm",  # big endian
    ):
        assert expected in CHECKED


@pytest.mark.parametrize(
    ("name", "needed"),
    [
        ("SC_ybr_full_422_uncompressed.dcm", 100 * 100 * 2),
        ("liver_1frame.dcm", 512 * 512 // 8),
        ("liver_expb_1frame.dcm", 512 * 512 // 8),
        ("examples_palette.dcm", 350 * 800),
        ("examples_rgb_color.dcm", 240 * 320 * 3),
        ("SC_rgb_small_odd.dcm", 3 * 3 * 3),
        ("rtdose.dcm", 10 * 10 * 4 * 15),
        ("rtdose_expb.dcm", 10 * 10 * 4 * 15),
        ("MR_small_implicit.dcm", 64 * 64 * 2),
    ],
)
def test_bundled_files_cut_short_are_refused(name: str, needed: int) -> None:
    # Given a bundled file whose Pixel Data lacks its last bytes (2 or 1 + the padding)
    ds = _read(BUNDLED / name)
    short = needed - 2 + needed % 2
    ds.PixelData = ds.PixelData[:short]
    # When its header is checked, Then it is refused, naming both lengths
    with pytest.raises(InvalidInstanceError, match=rf"has {short} bytes .* need {needed}$"):
        read_header(_encoded(ds))
    # And with all its bytes it is accepted
    ds.PixelData = _read(BUNDLED / name).PixelData[:needed]
    read_header(_encoded(ds))


def _ybr_422_16bit() -> tuple[Dataset, int]:
    ds = _read(BUNDLED / "SC_ybr_full_422_uncompressed.dcm")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = b"".join(bytes([b, 0]) for b in ds.PixelData)
    return ds, 100 * 100 * 2 * 2


def _relabelled(name: str, photometric: str, needed: int) -> Callable[[], tuple[Dataset, int]]:
    def make() -> tuple[Dataset, int]:
        ds = _read(BUNDLED / name)
        ds.PhotometricInterpretation = photometric
        ds.PixelData = ds.PixelData[:needed]
        return ds, needed

    return make


def _one_bit_frames() -> tuple[Dataset, int]:
    # 3 frames of 3 x 3: 27 bits packed across frame boundaries, 4 bytes (not 3 x 2)
    ds = _read(BUNDLED / "liver_1frame.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 3, 3, 3
    ds.PixelData = b"\xff\x01\x80\x07"
    return ds, 4


def _one_bit_odd() -> tuple[Dataset, int]:
    # 1 frame of 3 x 3: 9 bits, 2 bytes
    ds = _read(BUNDLED / "liver_1frame.dcm")
    ds.Rows, ds.Columns = 3, 3
    ds.PixelData = b"\xff\x01"
    return ds, 2


def _float_pixels(keyword: str, bits: int) -> Callable[[], tuple[Dataset, int]]:
    def make() -> tuple[Dataset, int]:
        ds = _read(BUNDLED / "CT_small.dcm")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ParametricMapStorage
        ds.BitsAllocated, ds.NumberOfFrames = bits, 2
        for k in ("BitsStored", "HighBit", "PixelRepresentation", "PixelData"):
            del ds[k]
        needed = 128 * 128 * 2 * bits // 8
        setattr(ds, keyword, bytes(needed))
        return ds, needed

    return make


DERIVED: dict[str, Callable[[], tuple[Dataset, int]]] = {
    "MONOCHROME1": _relabelled("CT_small.dcm", "MONOCHROME1", 128 * 128 * 2),
    "YBR_FULL": _relabelled("examples_rgb_color.dcm", "YBR_FULL", 240 * 320 * 3),
    "YBR_FULL_422-16bit": _ybr_422_16bit,
    # retired, 4:2:2 like YBR_FULL_422
    "YBR_PARTIAL_422": _relabelled("SC_ybr_full_422_uncompressed.dcm", "YBR_PARTIAL_422", 20000),
    # defined for compressed data only: a native one holds at least its 4:2:0 samples
    "YBR_PARTIAL_420": _relabelled("examples_rgb_color.dcm", "YBR_PARTIAL_420", 240 * 320 * 3 // 2),
    "1bit-3frames": _one_bit_frames,
    "1bit-odd": _one_bit_odd,
    "FloatPixelData": _float_pixels("FloatPixelData", 32),
    "DoubleFloatPixelData": _float_pixels("DoubleFloatPixelData", 64),
}


@pytest.mark.parametrize("layout", DERIVED)
def test_layouts_made_from_bundled_files(layout: str) -> None:
    # Given a layout no bundled file has, made from one, with exactly the bytes it needs
    ds, needed = DERIVED[layout]()
    keyword = next(k for k in PIXEL_KEYWORDS if k in ds)
    # When its header is checked, Then it is accepted
    read_header(_encoded(ds))
    # And a value shorter (one even step at least: the wire pads odd lengths) it is refused
    short = needed - max(2, ds.BitsAllocated // 8) + needed % 2
    setattr(ds, keyword, getattr(ds, keyword)[:short])
    with pytest.raises(InvalidInstanceError, match=rf"has {short} bytes .* need {needed}$"):
        read_header(_encoded(ds))


def test_ybr_full_422_is_stored_end_to_end(node_factory: NodeFactory) -> None:
    # Given a running node and pydicom's native YBR_FULL_422 file
    node = node_factory(quiet_period_s=3600.0, pacs_port=9)
    path = BUNDLED / "SC_ybr_full_422_uncompressed.dcm"
    original = _read(path)
    # When it is sent by C-STORE
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), [path], "MODALITY")
    # Then it is acknowledged with success
    assert [r.status for r in results] == [status.SUCCESS]
    # And the instance is in the spool with its pixel data intact
    rows = node.index.latest_instances(str(original.StudyInstanceUID))
    assert [r.sop_instance_uid for r in rows] == [str(original.SOPInstanceUID)]
    stored = dcmread(node.spool.root.parent / rows[0].path)
    assert stored.PhotometricInterpretation == "YBR_FULL_422"
    assert stored.PixelData == original.PixelData
