"""DICOM Segmentation (SEG) from a pipeline result, aligned voxel for voxel with the source.

Implements the Segmentation IOD (DICOM PS3.3 A.51, C.8.20) with highdicom: a BINARY SEG,
one segment per :class:`SegmentResult`, frame k of each segment derived from
``source_datasets[k]`` (Derivation Image Sequence per frame, Referenced Series Sequence).

An enhanced multi-frame source (Enhanced CT/MR, Legacy Converted Enhanced) is referenced
frame by frame: ``source_images`` is the one instance, and each SEG frame's Derivation
Image Sequence names the source frame (ReferencedFrameNumber) of its slice,
``result.volume.source_frames[k]``.  When the volume uses every frame of the instance, the
mask is laid out in source frame order so that highdicom pairs frame for frame; when it
uses some (one phase of several), the planes are given by position and the references
are narrowed to the frames of the volume.

Empty frames are kept by default (``omit_empty_frames=False``).  A SEG that omits them is
valid DICOM, but viewers have mapped the remaining frames onto the wrong slices (OHIF,
monai-deploy app-sdk#397, OHIF#2833 with gaps inside one segment); a full stack of frames
per segment lines up with the source series even in a viewer that matches frames by index.
BINARY frames are bit-packed, so the cost is slices x rows x columns / 8 bytes per segment
(9.8 MB for 300 x 512 x 512).  It also answers the all-empty mask: the segment keeps its
description and all of its (empty) frames, which highdicom would do anyway.  Where the
viewers are known to place frames by their references, a pipeline may leave empty frames
out (``omit_empty_frames = true``): for a 300-slice study with three lesions, 34 frames
instead of 300, 1.2 MB instead of 10 MB, and 0.27 s less to build and write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicomnode import __version__
from dicomnode.errors import OutputError
from dicomnode.outputs.common import (
    IHE_CODING_SCHEME,
    LO_MAX,
    MANUFACTURER,
    add_algorithm_equipment,
    check_algorithm,
    check_code,
    check_source_datasets,
    coded,
    multiframe_layout,
    new_uid,
    plain,
    series_description,
)
from dicomnode.pipelines.results import AlgorithmInfo, PipelineResult, SegmentResult

logger = logging.getLogger(__name__)

CONTENT_LABEL = "AI_SEGMENTATION"  # CS: upper case, digits, space, underscore; <= 16
CONTENT_CREATOR = "dicomnode^AI"
# Enhanced General Equipment needs a serial number (Type 1); software has none, so the
# build of the node that wrote the object stands in for it.
DEVICE_SERIAL_NUMBER = f"dicomnode {__version__}"


def _check_segments(result: PipelineResult) -> None:
    segments = result.segments
    if not segments:
        raise OutputError("result.segments is empty: a SEG needs at least one segment")
    for i, segment in enumerate(segments):
        where = f"result.segments[{i}]"
        if not isinstance(segment, SegmentResult):
            raise OutputError(f"{where} is a {type(segment).__name__}, not a SegmentResult")
        if segment.segment_number != i + 1:
            raise OutputError(
                f"{where}.segment_number is {segment.segment_number}; segments must be "
                f"numbered 1..n in order (expected {i + 1})"
            )
        mask = segment.mask
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            kind = getattr(mask, "dtype", type(mask).__name__)
            raise OutputError(f"{where}.mask must be a numpy bool array, not {kind}")
        if mask.shape != result.volume.shape:
            raise OutputError(
                f"{where}.mask has shape {mask.shape}, result.volume has {result.volume.shape}"
            )
        label = segment.label
        if not label.name or len(label.name) > LO_MAX or "\\" in label.name:
            raise OutputError(f"{where}.label.name must be 1..{LO_MAX} characters without '\\'")
        check_code(label.segment_category, f"{where}.label.segment_category")
        check_code(label.segment_type, f"{where}.label.segment_type")


def _segment_description(
    segment: SegmentResult, algorithm: AlgorithmInfo
) -> hd.seg.SegmentDescription:
    label = segment.label
    where = f"result.segments[{segment.segment_number - 1}].label"
    category = check_code(label.segment_category, f"{where}.segment_category")
    segment_type = check_code(label.segment_type, f"{where}.segment_type")
    return hd.seg.SegmentDescription(
        segment_number=segment.segment_number,
        segment_label=label.name,
        segmented_property_category=coded(category),
        segmented_property_type=coded(segment_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=coded(algorithm.family),
            version=algorithm.version,
            source=algorithm.manufacturer,
        ),
    )


def _stack_masks(segments: Sequence[SegmentResult]) -> npt.NDArray[np.bool_]:
    """(slices, rows, columns) for one segment, (..., segments) stacked for more."""
    if len(segments) == 1:
        return segments[0].mask
    return np.stack([s.mask for s in segments], axis=-1)


def _narrow_references(seg: Dataset, frames: set[int]) -> None:
    """Keep, in each frame's Derivation Image Sequence, only the source frames of the
    volume (highdicom names every frame at the position: those of other phases too)."""
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            sources = derivation.get("SourceImageSequence", [])
            kept = [s for s in sources if int(s.get("ReferencedFrameNumber", 0)) in frames]
            if len(kept) != len(sources):
                derivation.SourceImageSequence = kept


def build_segmentation(
    result: PipelineResult,
    source_datasets: Sequence[Dataset],
    *,
    series_number: int = 9001,
    instance_number: int = 1,
    uid_seed: str | None = None,
    omit_empty_frames: bool = False,
) -> Dataset:
    """Build a BINARY DICOM SEG with one segment per ``result.segments`` item.

    Parameters
    ----------
    result
        The pipeline result; every ``segments[i].mask`` is on ``result.volume``'s grid.
    source_datasets
        The source series in the volume's slice order: mask index k is written on the frame
        that references ``source_datasets[k]``; for an enhanced multi-frame source, the
        instance (once, or once per slice), mask index k on the frame that references frame
        ``result.volume.source_frames[k]``.  Only the header is needed, not pixel data
        (:func:`dicomnode.imaging.series.source_datasets` reads them).
    series_number, instance_number
        SeriesNumber and InstanceNumber of the new SEG.
    uid_seed
        When given, the Series and SOP Instance UIDs are derived from it, so that building
        again from the same seed (a retried job) gives the same UIDs; random otherwise.
    omit_empty_frames
        Leave out the frames where a segment is empty (see the module docstring: not all
        viewers place such a SEG right); an all-empty segment keeps its frames.

    Returns
    -------
    pydicom.dataset.Dataset
        A ``highdicom.seg.Segmentation``, ready for ``save_as``.

    Raises
    ------
    OutputError
        When an argument is invalid; the message names it.  Nothing is built before all
        arguments are checked.
    """
    _check_segments(result)
    check_algorithm(result.algorithm)
    sources = check_source_datasets(result, source_datasets)
    masks: npt.NDArray[np.bool_] = _stack_masks(result.segments)
    planes = None
    if result.volume.is_multiframe:
        if len(sources) != 1:
            raise OutputError(
                f"result.volume spans {len(sources)} multi-frame instances; a SEG derives "
                "from one multi-frame instance (or single-frame images)"
            )
        masks, planes = multiframe_layout(result, sources[0], masks)
    if not isinstance(omit_empty_frames, bool):
        raise OutputError(f"omit_empty_frames must be a bool, not {plain(omit_empty_frames)!r}")
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
            raise OutputError(f"{name} must be a positive integer, not {plain(value)!r}")

    algorithm = result.algorithm
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=masks,
            plane_positions=planes,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_segment_description(s, algorithm) for s in result.segments],
            series_instance_uid=new_uid(uid_seed, "seg", "series"),
            series_number=series_number,
            sop_instance_uid=new_uid(uid_seed, "seg", "instance"),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            device_serial_number=DEVICE_SERIAL_NUMBER,
            content_description=series_description("segmentation", algorithm),
            content_label=CONTENT_LABEL,
            content_creator_name=CONTENT_CREATOR,
            omit_empty_frames=omit_empty_frames,
            series_description=series_description("segmentation", algorithm),
            coding_schemes=[IHE_CODING_SCHEME],
        )
    except (ValueError, TypeError) as exc:  # highdicom's own checks; ours came first
        raise OutputError(f"highdicom refused the segmentation: {exc}") from exc
    if planes is not None:
        _narrow_references(seg, set(result.volume.source_frames))
    add_algorithm_equipment(seg, algorithm)
    logger.debug(
        "built SEG %s: %d segment(s), %d frames",
        seg.SOPInstanceUID,
        len(result.segments),
        seg.NumberOfFrames,
    )
    return seg
