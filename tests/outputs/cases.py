"""Phantom studies and hand-made pipeline results for the SEG/SR builder tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.imaging.series import volume_from_datasets
from dicomnode.imaging.volume import Volume
from dicomnode.inference.card import Code, Label
from dicomnode.outputs.validate import find_tool
from dicomnode.pipelines.results import (
    AlgorithmInfo,
    Classification,
    Finding,
    PipelineResult,
    SegmentResult,
)
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom

LESION = Label(
    index=0,
    name="Lesion",
    threshold=0.5,
    finding=Code("52988006", "SCT", "Lesion"),
    segment_category=Code("49755003", "SCT", "Morphologically Abnormal Structure"),
    segment_type=Code("52988006", "SCT", "Lesion"),
)
NODULE = replace(
    LESION,
    index=1,
    name="Nodule",
    finding=Code("27925004", "SCT", "Nodule"),
    segment_type=Code("27925004", "SCT", "Nodule"),
)
ALGORITHM = AlgorithmInfo(
    name="lesion-seg",
    version="1.0.0",
    manufacturer="dicomnode",
    family=Code("123110", "DCM", "Artificial Intelligence"),
)

# Small studies (a few ms to generate) that still hold three lesions in the lungs.
GEOMETRIES: dict[str, PhantomSpec] = {
    "axial": PhantomSpec(
        rows=64, columns=64, slices=24, pixel_spacing=(5.0, 5.0), slice_thickness=4.0, seed=3
    ),
    "axial-reversed": PhantomSpec(
        rows=64,
        columns=64,
        slices=24,
        pixel_spacing=(5.0, 5.0),
        slice_thickness=4.0,
        reverse_order=True,
        seed=4,
    ),
    "coronal-reversed-nonsquare": PhantomSpec(
        rows=48,
        columns=60,
        slices=30,
        pixel_spacing=(4.0, 5.5),
        slice_thickness=4.0,
        orientation="coronal",
        reverse_order=True,
        seed=5,
    ),
    "oblique-nonsquare": PhantomSpec(
        rows=56,
        columns=64,
        slices=24,
        pixel_spacing=(5.5, 5.0),
        slice_thickness=4.0,
        orientation="oblique",
        seed=6,
    ),
}


@dataclass
class Case:
    """A phantom study, its volume and a PipelineResult built from the ground truth."""

    phantom: Phantom
    volume: Volume
    source: list[Dataset]  # in the volume's slice order
    masks: list[npt.NDArray[np.bool_]]  # per lesion, in the volume's slice order
    result: PipelineResult

    @property
    def mask(self) -> npt.NDArray[np.bool_]:
        return self.result.segments[0].mask


def finding_from_mask(
    volume: Volume,
    mask: npt.NDArray[np.bool_],
    number: int,
    label: Label = LESION,
    segment_number: int = 1,
) -> Finding:
    """Measure one component simply (brute force diameter; the masks are small)."""
    ijk = np.argwhere(mask)
    points = volume.voxel_to_patient(ijk)
    diffs = points[:, None, :] - points[None, :, :]
    diameter = float(np.sqrt((diffs**2).sum(-1)).max()) if len(points) > 1 else 0.0
    centroid = points.mean(axis=0)
    return Finding(
        tracking_id=f"{label.name} {number}",
        tracking_uid=str(generate_uid()),
        segment_number=segment_number,
        label=label,
        volume_mm3=float(mask.sum()) * volume.voxel_volume_mm3,
        longest_diameter_mm=diameter,
        mean_hu=float(volume.pixels[mask].mean()),
        centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        voxel_count=int(mask.sum()),
        slice_indices=tuple(int(k) for k in np.unique(ijk[:, 0])),
    )


def make_case(spec: PhantomSpec) -> Case:
    phantom = generate_phantom(spec)
    volume = volume_from_datasets(phantom.datasets)
    index = {ds.SOPInstanceUID: i for i, ds in enumerate(phantom.datasets)}
    order = [index[uid] for uid in volume.sop_instance_uids]
    source = [phantom.datasets[i] for i in order]
    masks = [m[order] for m in phantom.lesion_masks]
    findings = tuple(finding_from_mask(volume, m, n + 1) for n, m in enumerate(masks) if m.any())
    result = PipelineResult(
        volume=volume,
        segments=(SegmentResult(1, LESION, phantom.mask[order]),),
        findings=findings,
        classifications=(Classification(LESION, 0.9731, positive=True),),
        algorithm=ALGORITHM,
    )
    return Case(phantom, volume, source, masks, result)


def require_tool(name: str) -> str:
    """Path of an external validator; fail in CI when it is missing, skip elsewhere."""
    path = find_tool(name)
    if path is None:
        message = f"{name} is not installed (dicom3tools / dcmtk)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
