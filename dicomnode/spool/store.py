"""Durable storage of received instances: the only thing the C-STORE handler calls.

:meth:`Spool.store` writes the bytes exactly as received (file meta + encoded dataset, no
decoding) to a temporary file, fsyncs it, renames it into
``spool/<study>/<series>/<sop>[.vN].dcm``, fsyncs the folder and records the instance in the
index.  Only when all of that has succeeded does it return, and only then does the node
answer 0x0000.

Duplicate policy (same SOP Instance UID again): identical bytes are acknowledged and
ignored; different bytes are kept as a new version (the newest version is the one
processed) and logged.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
import sqlite3
import threading
import zlib
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from pydicom import DataElement, Dataset, config, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicomnode.errors import InvalidInstanceError, OutOfResourcesError, SpoolError
from dicomnode.fsutil import remove_partial_files, write_bytes_atomically
from dicomnode.spool.index import Index, InstanceHeader, NewInstance
from dicomnode.spool.structure import Structure, check_structure, split_file_meta
from dicomnode.uids import is_image_storage, is_own_uid

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
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


class StoreOutcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new_version"


def read_header(encoded: bytes) -> InstanceHeader:
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


def _read_deflated_header(encoded: bytes, ts: str) -> InstanceHeader:
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
    module = _image_pixel_module(structure)
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


class Spool:
    """Received instances on disk plus their index rows."""

    def __init__(
        self,
        data_dir: Path,
        index: Index,
        *,
        min_free_bytes: int,
        rerun_late: bool = True,
        drives: Callable[[InstanceHeader], bool] = drives_processing,
    ) -> None:
        self.root = data_dir / SPOOL_DIR
        self.tmp = data_dir / "tmp"
        self.index = index
        self.min_free_bytes = min_free_bytes
        self.rerun_late = rerun_late
        self.drives = drives
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int = 0) -> None:
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise OutOfResourcesError(
                f"data directory has {free // 2**20} MiB free, below the watermark of "
                f"{self.min_free_bytes // 2**20} MiB"
            )

    def store(
        self,
        encoded: bytes,
        *,
        calling_ae: str,
        calling_host: str,
        header: InstanceHeader | None = None,
    ) -> StoreOutcome:
        """Store one instance durably; raise a :class:`SpoolError` subclass on failure.

        Stores of one SOP Instance UID are serialised (a sender may retry on a second
        association while the first is still being stored): both would pick the same
        version and file name, and the loser must not remove the winner's file.
        """
        header = header or read_header(encoded)
        uid = header.sop_instance_uid
        with self._uid_locks[zlib.crc32(uid.encode()) % len(self._uid_locks)]:
            return self._store(encoded, calling_ae, calling_host, header)

    def _store(
        self, encoded: bytes, calling_ae: str, calling_host: str, header: InstanceHeader
    ) -> StoreOutcome:
        digest = hashlib.sha256(encoded).hexdigest()
        content = hashlib.sha256(memoryview(encoded)[split_file_meta(encoded)[0] :]).hexdigest()
        versions = self.index.instance_versions(header.sop_instance_uid)
        if any(v.sha256 == digest or v.content_sha256 == content for v in versions):
            log.info("duplicate instance %s ignored (identical bytes)", header.sop_instance_uid)
            try:
                self.index.touch_study(header.study_instance_uid)
            except sqlite3.Error as exc:  # stored already: still acknowledged
                log.warning("duplicate %s: study not touched: %s", header.sop_instance_uid, exc)
            return StoreOutcome.DUPLICATE
        self.check_space(len(encoded))
        version = (versions[-1].version + 1) if versions else 1
        relative = "/".join(
            (
                SPOOL_DIR,
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_instance_uid + (f".v{version}" if version > 1 else "") + ".dcm",
            )
        )
        final = self.root.parent / relative
        try:
            write_bytes_atomically(final, encoded, self.tmp)
        except OSError as exc:
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfResourcesError(f"disk full while writing {final.name}") from exc
            raise SpoolError(f"cannot write {final}: {exc}") from exc
        new = NewInstance(
            header=header,
            version=version,
            path=relative,
            content_sha256=content,
            drives=self.drives(header),
            sha256=digest,
            size=len(encoded),
            calling_ae=calling_ae,
            calling_host=calling_host,
        )
        try:
            self.index.add_instance(new, rerun_late=self.rerun_late)
        except sqlite3.IntegrityError:
            # Another process indexed this version meanwhile: keep its file, store ours anew.
            versions = self.index.instance_versions(header.sop_instance_uid)
            if all(v.path != final for v in versions):
                final.unlink(missing_ok=True)
            return self._store(encoded, calling_ae, calling_host, header)
        except sqlite3.Error as exc:
            final.unlink(missing_ok=True)
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise OutOfResourcesError(f"disk full while indexing {final.name}") from exc
            raise SpoolError(f"cannot index {header.sop_instance_uid}: {exc}") from exc
        if version > 1:
            log.warning(
                "instance %s received again with different content: kept as version %d",
                header.sop_instance_uid,
                version,
            )
            return StoreOutcome.NEW_VERSION
        return StoreOutcome.STORED

    def purge_study(self, study_uid: str) -> int:
        """Delete a study's spooled files and index rows (retention); returns files removed."""
        removed = 0
        for path in self.index.instance_paths(study_uid):
            if path.exists():
                path.unlink()
                removed += 1
        shutil.rmtree(self.root / study_uid, ignore_errors=True)
        self.index.remove_study(study_uid)
        return removed

    def cleanup_tmp(self) -> int:
        """Remove partial files left by a crash (they were never acknowledged)."""
        return remove_partial_files(self.tmp)


def is_deflated(transfer_syntax_uid: str) -> bool:
    return transfer_syntax_uid == DeflatedExplicitVRLittleEndian
