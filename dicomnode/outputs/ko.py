"""Key Object Selection of a pipeline result: the key image of each finding.

Implements the Key Object Selection Document IOD (DICOM PS3.3 A.35.4) with highdicom and
the template TID 2010 "Key Object Selection" (PS3.16): title (113000, DCM, "Of
Interest"), the algorithm as device observer, a Key Object Description, and one IMAGE
item per key image.  A finding's key image is the source slice where its cross-section
is largest (:attr:`~dicomnode.pipelines.results.Finding.key_slice`); a viewer that lists
key objects (the PACS's "key images", OHIF, Weasis) jumps there.

TID 2010 has no place for a finding's tracking identifier beside its image (an IMAGE
item has no children in a KOS), so the description names them, one line per finding in
tracking order: ``lesion 1: image 12 (slice 12 of 40), tracking UID 1.2...``; the SR's
TID 1411 group of that finding carries the same identifier and UID.  Two findings on one
slice share its IMAGE item.  An enhanced multi-frame source is referenced with the frame
numbers of the key slices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from dicomnode.errors import OutputError
from dicomnode.inference.card import Code
from dicomnode.outputs.common import (
    MANUFACTURER,
    check_algorithm,
    check_source_datasets,
    coded,
    new_uid,
    plain,
    series_description,
)
from dicomnode.outputs.sr import device_observer
from dicomnode.pipelines.results import Finding, PipelineResult

logger = logging.getLogger(__name__)

OF_INTEREST = Code("113000", "DCM", "Of Interest")  # CID 7010 Key Object Selection Title


def key_slices(result: PipelineResult) -> list[tuple[Finding, int]]:
    """Each finding with its key slice (index into the volume), in tracking order."""
    n_slices = result.volume.shape[0]
    out = []
    for i, finding in enumerate(result.findings):
        if not isinstance(finding, Finding):
            raise OutputError(f"result.findings[{i}] is a {type(finding).__name__}, not a Finding")
        if not finding.slice_indices and finding.key_slice is None:
            raise OutputError(f"result.findings[{i}] has no slices")
        k = finding.key_slice_index
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_slices:
            raise OutputError(
                f"result.findings[{i}].key_slice {plain(k)!r} is not a slice of the "
                f"volume's {n_slices}"
            )
        out.append((finding, k))
    return out


def _image_label(ds: Dataset, k: int, n_slices: int, frame: int) -> str:
    number = ds.get("InstanceNumber")
    image = f"image {number}" if number not in (None, "") else f"instance {ds.SOPInstanceUID}"
    if frame:
        image += f" frame {frame}"
    return f"{image} (slice {k + 1} of {n_slices})"


def build_key_object_selection(
    result: PipelineResult,
    source_datasets: Sequence[Dataset],
    *,
    series_number: int = 9004,
    instance_number: int = 1,
    uid_seed: str | None = None,
) -> Dataset:
    """Build a KOS that points at the key image of each finding of ``result``.

    Parameters
    ----------
    result
        The pipeline result; it must have at least one finding.
    source_datasets
        The source series in the volume's slice order (headers suffice), as for
        :func:`dicomnode.outputs.seg.build_segmentation`.
    series_number, instance_number
        SeriesNumber and InstanceNumber of the new document.
    uid_seed
        When given, the Series and SOP Instance UIDs are derived from it.

    Raises
    ------
    OutputError
        When an argument is invalid or there is no finding; the message names it.
    """
    check_algorithm(result.algorithm)
    sources = check_source_datasets(result, source_datasets)
    if not result.findings:
        raise OutputError("result.findings is empty: a key object selection needs a finding")
    chosen = key_slices(result)
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
            raise OutputError(f"{name} must be a positive integer, not {plain(value)!r}")

    volume = result.volume
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    frames: dict[str, list[int]] = {}  # key images in tracking order, frames per instance
    lines = []
    for finding, k in chosen:
        uid = volume.sop_instance_uids[k]
        frame = volume.frame_number(k)
        wanted = frames.setdefault(uid, [])
        if frame and frame not in wanted:
            wanted.append(frame)
        label = _image_label(by_uid[uid], k, volume.shape[0], frame)
        lines.append(f"{finding.tracking_id}: {label}, tracking UID {finding.tracking_uid}")
    referenced = [by_uid[uid] for uid in frames]
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=coded(OF_INTEREST),
            referenced_objects=referenced,
            observer_device_context=device_observer(result.algorithm),
            description="Key images of the findings (largest cross-section):\n" + "\n".join(lines),
        )
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=referenced,
            content=content,
            series_instance_uid=new_uid(uid_seed, "ko", "series"),
            series_number=series_number,
            sop_instance_uid=new_uid(uid_seed, "ko", "instance"),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            series_description=series_description("key images", result.algorithm),
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks; ours first
        raise OutputError(f"highdicom refused the key object selection: {exc}") from exc
    _reference_frames(kos, frames)
    logger.debug("built KOS %s: %d key image(s)", kos.SOPInstanceUID, len(referenced))
    return kos


def _reference_frames(kos: Dataset, frames: dict[str, list[int]]) -> None:
    """Narrow each IMAGE item of a multi-frame instance to the key frames."""
    for item in kos.ContentSequence:
        if item.get("ValueType") != "IMAGE":
            continue
        for ref in item.ReferencedSOPSequence:
            wanted = frames.get(str(ref.ReferencedSOPInstanceUID))
            if wanted:
                ref.ReferencedFrameNumber = sorted(wanted)
