"""Parametric Map of a pipeline's heat map: the explanation, aligned with the source series.

Implements the Parametric Map IOD (DICOM PS3.3 A.75, C.8.32) with highdicom: one frame per
source slice (frame k derived from ``source_datasets[k]``, as the SEG), the heat map's
uint8 levels stored as 16-bit integers (the IOD's only integer size), and a Real World
Value Mapping that turns a level ``v`` into the model's probability ``v / 255`` (unit 1,
quantity "Probability"), with the label and the method in its LUT explanation.  A viewer
that shows Parametric Maps over their source (OHIF, 3D Slicer) draws it as a colour
overlay; the window 0..255 shows probabilities 0..1.

One map per :class:`~dicomnode.pipelines.results.HeatMap`: the label it explains is in
the content description and the mapping; the SR lists the map as evidence.  Every source
geometry the SEG builder accepts is accepted here, enhanced multi-frame sources included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicomnode.errors import OutputError
from dicomnode.inference.card import Code
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
from dicomnode.outputs.seg import DEVICE_SERIAL_NUMBER
from dicomnode.pipelines.results import HEAT_MAP_LEVELS, HeatMap, PipelineResult

logger = logging.getLogger(__name__)

CONTENT_LABEL = "AI_HEAT_MAP"  # CS, <= 16
CONTENT_CREATOR = "dicomnode^AI"
LUT_LABEL = "PROBABILITY"  # SH, <= 16
PROBABILITY = Code("122157", "DCM", "Probability")
NO_UNITS = Code("1", "UCUM", "no units")


def check_heat_map(result: PipelineResult, index: int) -> HeatMap:
    """``result.heat_maps[index]`` is a uint8 map of the volume's shape with a coded label."""
    where = f"result.heat_maps[{index}]"
    if isinstance(index, bool) or not isinstance(index, int):
        raise OutputError(f"heat map index must be an integer, not {plain(index)!r}")
    if not 0 <= index < len(result.heat_maps):
        raise OutputError(f"{where} does not exist: the result has {len(result.heat_maps)}")
    heat_map = result.heat_maps[index]
    if not isinstance(heat_map, HeatMap):
        raise OutputError(f"{where} is a {type(heat_map).__name__}, not a HeatMap")
    values = heat_map.values
    if not isinstance(values, np.ndarray) or values.dtype != np.uint8:
        kind = getattr(values, "dtype", type(values).__name__)
        raise OutputError(f"{where}.values must be a numpy uint8 array, not {kind}")
    if values.shape != result.volume.shape:
        raise OutputError(
            f"{where}.values has shape {values.shape}, result.volume has {result.volume.shape}"
        )
    check_code(heat_map.label.finding, f"{where}.label.finding")
    if not heat_map.method or not heat_map.method.strip():
        raise OutputError(f"{where}.method must be a non-empty string")
    if heat_map.algorithm is not None:
        check_algorithm(heat_map.algorithm, f"{where}.algorithm")
    return heat_map


def lut_explanation(heat_map: HeatMap) -> str:
    """``segmentation probability of lesion`` (LO: at most 64 characters)."""
    text = f"{heat_map.method} of {heat_map.label.name}"
    return text if len(text) <= LO_MAX else text[: LO_MAX - 3].rstrip() + "..."


def build_parametric_map(
    result: PipelineResult,
    source_datasets: Sequence[Dataset],
    *,
    index: int = 0,
    series_number: int = 9003,
    instance_number: int = 1,
    uid_seed: str | None = None,
) -> Dataset:
    """Build a Parametric Map of ``result.heat_maps[index]`` over the source series.

    Parameters
    ----------
    result
        The pipeline result; its heat map is on ``result.volume``'s grid.
    source_datasets
        The source series in the volume's slice order (headers suffice), as for
        :func:`dicomnode.outputs.seg.build_segmentation`.
    index
        Which heat map of the result.
    series_number, instance_number
        SeriesNumber and InstanceNumber of the new object.
    uid_seed
        When given, the Series and SOP Instance UIDs are derived from it (and ``index``):
        a retried job writes the same UIDs.

    Raises
    ------
    OutputError
        When an argument is invalid; the message names it.  Nothing is built before all
        arguments are checked.
    """
    heat_map = check_heat_map(result, index)
    check_algorithm(result.algorithm)
    sources = check_source_datasets(result, source_datasets)
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
            raise OutputError(f"{name} must be a positive integer, not {plain(value)!r}")
    # The IOD stores integers in 16 bits (Bits Allocated 16; dciodvfy refuses 8).
    values = heat_map.values.astype(np.uint16)
    planes = None
    if result.volume.is_multiframe:
        if len(sources) != 1:
            raise OutputError(
                f"result.volume spans {len(sources)} multi-frame instances; a Parametric Map "
                "derives from one multi-frame instance (or single-frame images)"
            )
        values, planes = multiframe_layout(result, sources[0], values)

    algorithm = result.algorithm_of(heat_map)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation=lut_explanation(heat_map),
        unit=coded(NO_UNITS),
        value_range=(0, HEAT_MAP_LEVELS),
        slope=1.0 / HEAT_MAP_LEVELS,
        intercept=0.0,
        quantity_definition=coded(PROBABILITY),
    )
    description = series_description("heat map", algorithm)
    try:
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=values,
            plane_positions=planes,
            series_instance_uid=new_uid(uid_seed, "pm", str(index), "series"),
            series_number=series_number,
            sop_instance_uid=new_uid(uid_seed, "pm", str(index), "instance"),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            device_serial_number=DEVICE_SERIAL_NUMBER,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[
                hd.VOILUTTransformation(
                    window_center=HEAT_MAP_LEVELS / 2, window_width=HEAT_MAP_LEVELS + 1
                )
            ],
            content_description=f"{heat_map.label.name}: {heat_map.method}"[:LO_MAX],
            content_label=CONTENT_LABEL,
            content_creator_name=CONTENT_CREATOR,
            series_description=description,
            coding_schemes=[IHE_CODING_SCHEME],
        )
    except (ValueError, TypeError) as exc:  # highdicom's own checks; ours came first
        raise OutputError(f"highdicom refused the parametric map: {exc}") from exc
    if "Laterality" not in pm:
        # General Series Type 2C: dciodvfy asks for it unless a frame says its laterality;
        # the source's when it has one, else empty (unknown to the node).
        pm.Laterality = sources[0].get("Laterality", "")
    add_algorithm_equipment(pm, algorithm)
    logger.debug("built parametric map %s: %d frames", pm.SOPInstanceUID, pm.NumberOfFrames)
    return pm
