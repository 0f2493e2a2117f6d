"""What the node reads of a received instance before it answers, without decoding it.

The element headers are walked (:mod:`dicomnode.spool.structure`) and the few values needed
are taken from the walk: the four UIDs that file and index the instance, and what sizes
native Pixel Data, so that a truncated image is refused rather than acknowledged.  Deflated
data sets are inflated by pydicom.  Also here: which instances drive processing by default,
and the data set digest that tells a duplicate from a new version.
"""

from __future__ import annotations

import hashlib
import io
import re
import zlib

from pydicom import DataElement, Dataset, config, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicomnode.errors import InvalidInstanceError
from dicomnode.spool.index import InstanceHeader
from dicomnode.spool.structure import Structure, check_structure, split_file_meta
from dicomnode.uids import is_image_storage, is_own_uid

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_HEADER_TAGS = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}
_IMAGE_PIXEL_TAGS = (0x00280010, 0x00280011, 0x00280100)  # Rows, Columns, Bits Allocated
_SAMPLES_PER_PIXEL, _NUMBER_OF_FRAMES = 0x00280002, 0x00280008
_PHOTOMETRIC_INTERPRETATION = 0x00280004
_WANTED = frozenset(
    [
        *_HEADER_TAGS.values(),
        *_IMAGE_PIXEL_TAGS,
        _SAMPLES_PER_PIXEL,
        _NUMBER_OF_FRAMES,
        _PHOTOMETRIC_INTERPRETATION,
    ]
)
#: Chroma subsampled layouts pydicom's get_expected_length does not name, as the one that
#: stores as many bytes (PS3.3 C.7.6.3.1.2): the retired YBR_PARTIAL_422 is 4:2:2 too.
_SAME_LENGTH_AS = {"YBR_PARTIAL_422": "YBR_FULL_422"}


def read_header(encoded: bytes | memoryview) -> InstanceHeader:
    """Check the structure of encoded bytes (file meta + dataset) and read the four UIDs.

    Nothing is decoded: the element headers are walked (:mod:`dicomnode.spool.structure`)
    and the few values needed are taken from the walk.  A truncated or corrupt dataset, an
    invalid or missing UID, an image without Pixel Data or native Pixel Data shorter than
    its Image Pixel module declares (see :func:`_expected_length`) raise
    :class:`InvalidInstanceError`.
    """
    try:
        offset, ts = split_file_meta(encoded)
        if not _UID.match(ts):
            raise InvalidInstanceError(f"the file meta has no valid Transfer Syntax UID: {ts!r}")
        if is_deflated(ts):
            return _read_deflated_header(encoded, ts)
        structure = check_structure(encoded, offset, UID(ts), _WANTED)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # an unknown transfer syntax, say
        raise InvalidInstanceError(f"cannot parse the dataset: {exc!r}") from exc
    values = [structure.text(tag) for tag in _HEADER_TAGS.values()]
    _check_uids(values)
    _check_pixels(structure, values[0])
    sop_class, sop_instance, study, series = values
    return InstanceHeader(sop_class, sop_instance, study, series, ts)


def _read_deflated_header(encoded: bytes | memoryview, ts: str) -> InstanceHeader:
    """pydicom inflates and reads the header elements (no structure walk of the stream)."""
    try:
        ds = dcmread(io.BytesIO(encoded), stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
        values = [str(ds.get(k, "")).strip() for k in _HEADER_TAGS]
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, zlib.error) as exc:
        raise InvalidInstanceError(f"cannot parse the dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise InvalidInstanceError(f"cannot parse the dataset: {exc!r}") from exc
    _check_uids(values)
    sop_class, sop_instance, study, series = values
    return InstanceHeader(sop_class, sop_instance, study, series, ts)


def _check_uids(values: list[str]) -> None:
    for keyword, value in zip(_HEADER_TAGS, values, strict=True):
        if not value:
            raise InvalidInstanceError(f"the dataset has no {keyword}")
        if len(value) > 64 or not _UID.match(value):
            raise InvalidInstanceError(f"{keyword} {value[:70]!r} is not a valid UID")


def _check_pixels(structure: Structure, sop_class: str) -> None:
    """An image has pixels, and native Pixel Data holds every frame its header declares."""
    if not structure.has_pixels:
        name = UID(sop_class).name
        if "Image Storage" in name:
            raise InvalidInstanceError(f"the dataset is a {name} without Pixel Data (truncated?)")
        return
    length = structure.pixel_data_length
    simple = _simple_expected_length(structure)
    if length is not None and simple is not None and length >= simple:
        return  # the common case, without building the module (receive fast path)
    module = _image_pixel_module(structure)  # raises for a malformed Rows, Columns ...
    if length is None or module is None:
        return  # encapsulated (its fragments were walked), or no image pixel module
    needed = _expected_length(module)
    if length < needed:
        raise InvalidInstanceError(
            f"Pixel Data has {length} bytes but {module.NumberOfFrames} frame(s) of "
            f"{module.Rows} x {module.Columns} {module.PhotometricInterpretation or 'pixels'} "
            f"with {module.SamplesPerPixel} sample(s) of Bits Allocated {module.BitsAllocated} "
            f"need {needed}"
        )


#: Photometric interpretations whose native pixel data is Rows x Columns x Samples x
#: Frames x Bits Allocated / 8 (Bits Allocated 1 aside): no chroma subsampling.
_PLAIN_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"})


def _simple_expected_length(structure: Structure) -> int | None:
    """The expected native pixel length for plain layouts, None for anything else (then
    pydicom's :func:`_expected_length` decides, with the module built)."""
    try:
        rows, columns, bits = (structure.unsigned(t) for t in _IMAGE_PIXEL_TAGS)
        samples = structure.unsigned(_SAMPLES_PER_PIXEL) or 1
        frames = max(1, int(structure.text(_NUMBER_OF_FRAMES) or 1))
    except (InvalidInstanceError, ValueError):
        return None
    photometric = structure.text(_PHOTOMETRIC_INTERPRETATION)
    if rows is None or columns is None or bits is None or photometric not in _PLAIN_PHOTOMETRIC:
        return None
    if bits % 8:
        return None
    return rows * columns * samples * frames * (bits // 8)


def _image_pixel_module(structure: Structure) -> Dataset | None:
    """The walked attributes that size native pixel data; None without Rows, Columns or
    Bits Allocated.  A missing Samples per Pixel or an unreadable frame count counts as 1:
    such content is the decoder's to report."""
    rows, columns, bits_allocated = (structure.unsigned(t) for t in _IMAGE_PIXEL_TAGS)
    if rows is None or columns is None or bits_allocated is None:
        return None
    try:
        frames = max(1, int(structure.text(_NUMBER_OF_FRAMES) or 1))
    except ValueError:
        frames = 1
    module = Dataset()
    for tag, vr, value in (
        (_IMAGE_PIXEL_TAGS[0], "US", rows),
        (_IMAGE_PIXEL_TAGS[1], "US", columns),
        (_IMAGE_PIXEL_TAGS[2], "US", bits_allocated),
        (_SAMPLES_PER_PIXEL, "US", structure.unsigned(_SAMPLES_PER_PIXEL) or 1),
        (_NUMBER_OF_FRAMES, "IS", frames),
        (_PHOTOMETRIC_INTERPRETATION, "CS", structure.text(_PHOTOMETRIC_INTERPRETATION)),
    ):  # as received: an odd value is no reason to warn (or raise) here
        module.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
    return module


def _expected_length(module: Dataset) -> int:
    """Bytes of native pixel data the Image Pixel module declares, odd-length padding aside.

    pydicom's :func:`~pydicom.pixels.utils.get_expected_length` packs Bits Allocated 1 frames
    bit by bit (PS3.5 8.1.1) and stores YBR_FULL_422 as 2 samples a pixel (PS3.3
    C.7.6.3.1.2).  YBR_PARTIAL_420 is defined for compressed pixel data only; a native one
    must hold at least its 4:2:0 samples, half of the full 3 a pixel.
    """
    photometric = str(module.PhotometricInterpretation)
    if photometric == "YBR_PARTIAL_420":
        full = module.copy()
        full.PhotometricInterpretation = "YBR_FULL"
        return get_expected_length(full) // 2
    if photometric in _SAME_LENGTH_AS:
        module = module.copy()
        module.PhotometricInterpretation = _SAME_LENGTH_AS[photometric]
    return get_expected_length(module)


def drives_processing(header: InstanceHeader) -> bool:
    """The default rule: images drive processing; the node's own results and non-image
    objects (SEG, SR, KOS, presentation states, RT, documents, ...) are only stored."""
    return is_image_storage(header.sop_class_uid) and not is_own_uid(header.sop_instance_uid)


def dataset_sha256(encoded: bytes | memoryview) -> str:
    """SHA-256 of the data set of encoded bytes (what follows the file meta): equal for
    the same data set whatever file meta a sender or a forwarding PACS wrote."""
    return hashlib.sha256(memoryview(encoded)[split_file_meta(encoded)[0] :]).hexdigest()


def is_deflated(transfer_syntax_uid: str) -> bool:
    return transfer_syntax_uid == DeflatedExplicitVRLittleEndian
