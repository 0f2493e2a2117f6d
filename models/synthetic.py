"""Write a training data folder of synthetic CT series with DICOM SEG ground truth.

Each case is a phantom series from :func:`dicomnode.synthetic.phantom.generate_phantom`
plus a binary DICOM Segmentation (PS3.3 A.51) of its lesions, built with highdicom from
the phantom's exact mask -- the same kind of object the node writes and a radiologist
sends back.  Cases vary lesion count, size and contrast, noise, pixel spacing, slice
thickness and orientation; a fraction has no lesion at all (an empty segment).

Layout::

    OUT/case_0000/CT/IM_00001.dcm ...
    OUT/case_0000/SEG/SEG.dcm
    OUT/manifest.json       the generating spec and lesions of every case

Run ``dicomnode synth --out DIR --cases N --seed S``.  This module
does not import TensorFlow.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.coding import Code as PydicomCode

from dicomnode.errors import ImagingError
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom, write_phantom

log = logging.getLogger(__name__)

LESION_CATEGORY = PydicomCode("49755003", "SCT", "Morphologically Altered Structure")
LESION_TYPE = PydicomCode("4147007", "SCT", "Mass")
ORIENTATIONS = ("axial", "axial", "axial", "oblique", "coronal", "sagittal")


@dataclass(frozen=True)
class SyntheticConfig:
    """Ranges the cases are drawn from (uniformly unless said otherwise)."""

    negative_fraction: float = 0.2
    lesions_per_case: tuple[int, int] = (1, 4)
    lesion_radius_mm: tuple[float, float] = (2.5, 15.0)
    lesion_hu: tuple[float, float] = (-450.0, 100.0)
    noise_hu: tuple[float, float] = (5.0, 35.0)
    pixel_spacing_mm: tuple[float, float] = (0.8, 1.8)
    field_of_view_mm: tuple[float, float] = (300.0, 380.0)
    slice_thickness_mm: tuple[float, float] = (1.5, 5.0)
    slab_mm: tuple[float, float] = (60.0, 110.0)
    max_slices: int = 48
    max_matrix: int = 384
    orientations: tuple[str, ...] = ORIENTATIONS


#: Held-out small lesions (issue 12 item 5): radius 3-5 mm at 0.6 mm pixels and 1.25 mm
#: slices, 2-4 lesions per case, every case positive.
SMALL_LESION_CONFIG = SyntheticConfig(
    negative_fraction=0.0,
    lesions_per_case=(2, 4),
    lesion_radius_mm=(3.0, 5.0),
    pixel_spacing_mm=(0.6, 0.6),
    field_of_view_mm=(330.0, 330.0),
    slice_thickness_mm=(1.25, 1.25),
    slab_mm=(45.0, 55.0),
    max_matrix=560,
)

#: Fine-grid training cases: pixels of 0.5-0.9 mm, thin slices, mostly small lesions.
FINE_GRID_CONFIG = SyntheticConfig(
    negative_fraction=0.1,
    lesions_per_case=(2, 5),
    lesion_radius_mm=(2.5, 8.0),
    pixel_spacing_mm=(0.5, 0.9),
    field_of_view_mm=(330.0, 380.0),
    slice_thickness_mm=(1.0, 2.0),
    slab_mm=(40.0, 60.0),
    max_slices=40,
    max_matrix=640,
)

#: Named configurations for ``dicomnode synth``-like scripts and the tests.
PRESETS: dict[str, SyntheticConfig] = {
    "default": SyntheticConfig(),
    "small-lesions": SMALL_LESION_CONFIG,
    "fine-grid": FINE_GRID_CONFIG,
}


def draw_spec(index: int, seed: int, config: SyntheticConfig) -> PhantomSpec:
    """The phantom spec of case ``index`` (deterministic in ``seed`` and ``index``)."""
    rng = np.random.default_rng([seed, index, 17])
    spacing = round(float(rng.uniform(*config.pixel_spacing_mm)), 3)
    fov = float(rng.uniform(*config.field_of_view_mm))
    matrix = min(config.max_matrix, 2 * round(fov / spacing / 2))
    thickness = round(float(rng.uniform(*config.slice_thickness_mm)), 2)
    slices = int(np.clip(round(rng.uniform(*config.slab_mm) / thickness), 8, config.max_slices))
    negative = rng.uniform() < config.negative_fraction
    n_lesions = (
        0
        if negative
        else int(rng.integers(config.lesions_per_case[0], config.lesions_per_case[1] + 1))
    )
    hu_lo = float(rng.uniform(config.lesion_hu[0], config.lesion_hu[1] - 50.0))
    return PhantomSpec(
        rows=matrix,
        columns=matrix,
        slices=slices,
        pixel_spacing=(spacing, spacing),
        slice_thickness=thickness,
        orientation=str(rng.choice(config.orientations)),
        reverse_order=bool(rng.uniform() < 0.3),
        n_lesions=n_lesions,
        lesion_radius_mm=config.lesion_radius_mm,
        lesion_hu=(hu_lo, hu_lo + 50.0),
        noise_hu=round(float(rng.uniform(*config.noise_hu)), 1),
        seed=int(rng.integers(2**31)),
        patient_id=f"SYN{seed:04d}{index:05d}",
        patient_name=f"SYNTHETIC^CASE{index:05d}",
        accession_number=f"S{seed:04d}{index:05d}",
        series_description=f"SYNTHETIC CASE {index}",
    )


def generate_case(spec: PhantomSpec) -> Phantom:
    """Generate a phantom, dropping lesions until they fit the imaged volume."""
    while True:
        try:
            return generate_phantom(spec)
        except ImagingError:
            if spec.n_lesions == 0:
                raise
            lo, hi = spec.lesion_radius_mm
            if hi > lo + 1.0:
                spec = replace(spec, lesion_radius_mm=(lo, max(lo + 1.0, hi * 0.7)))
            else:
                spec = replace(spec, n_lesions=spec.n_lesions - 1)


def build_segmentation(phantom: Phantom, series_number: int = 100) -> hd.seg.Segmentation:
    """A binary SEG of the phantom's lesion mask, one segment, on the source grid."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name="dicomnode phantom ground truth",
        family=PydicomCode("123109", "DCM", "Manual Processing"),
        version="1",
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=LESION_CATEGORY,
        segmented_property_type=LESION_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        algorithm_identification=algorithm,
    )
    return hd.seg.Segmentation(
        source_images=phantom.datasets,
        pixel_array=phantom.mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dicomnode",
        manufacturer_model_name="synthetic ground truth",
        software_versions="1",
        device_serial_number="0",
        content_label="GROUNDTRUTH",
        omit_empty_frames=True,
    )


def write_case(phantom: Phantom, directory: Path) -> dict[str, object]:
    """Write the series and its SEG; return the manifest entry."""
    write_phantom(phantom, directory / "CT")
    seg_dir = directory / "SEG"
    seg_dir.mkdir(parents=True, exist_ok=True)
    build_segmentation(phantom).save_as(seg_dir / "SEG.dcm")
    spec = phantom.spec
    voxel = spec.pixel_spacing[0] * spec.pixel_spacing[1] * spec.slice_thickness
    return {
        "case": directory.name,
        "series_instance_uid": str(phantom.datasets[0].SeriesInstanceUID),
        "orientation": spec.orientation,
        "matrix": [spec.slices, spec.rows, spec.columns],
        "pixel_spacing_mm": list(spec.pixel_spacing),
        "slice_thickness_mm": spec.slice_thickness,
        "noise_hu": spec.noise_hu,
        "lesions": [
            {
                **asdict(lesion),
                "voxels": int(m.sum()),
                "volume_mm3": round(float(m.sum()) * voxel, 1),
                "sphere_volume_mm3": round(4.0 / 3.0 * math.pi * lesion.radius_mm**3, 1),
            }
            for lesion, m in zip(phantom.lesions, phantom.lesion_masks, strict=True)
        ],
    }


def write_dataset(
    out: Path, cases: int, seed: int, config: SyntheticConfig = SyntheticConfig()
) -> list[dict[str, object]]:
    """Generate ``cases`` phantom cases with SEG labels under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for index in range(cases):
        phantom = generate_case(draw_spec(index, seed, config))
        entry = write_case(phantom, out / f"case_{index:04d}")
        manifest.append(entry)
        log.info(
            "case %d/%d: %s %s, %d lesion(s)",
            index + 1,
            cases,
            phantom.spec.orientation,
            entry["matrix"],
            len(phantom.lesions),
        )
    summary = {"seed": seed, "cases": cases, "config": asdict(config), "manifest": manifest}
    (out / "manifest.json").write_text(json.dumps(summary, indent=1) + "\n")
    return manifest
