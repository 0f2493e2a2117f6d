"""Training data from real DICOM: image series paired with DICOM SEG label objects.

:func:`scan_folder` indexes a folder tree of DICOM files, groups image instances by
SeriesInstanceUID and pairs every Segmentation with the series it was drawn on
(ReferencedSeriesSequence, else the referenced SOP instances).  :func:`load_case` builds the
HU volume with the node's own series loader and the per-slice label mask on exactly that
grid (highdicom ``get_pixels_by_source_instance``).  :func:`prepare_case` then applies the
bundle's preprocessing through the runtime's functions (``dicomnode.inference.preprocess``),
so training sees what inference sees.  The tf.data pipelines draw patches (optionally 2.5D
stacks) from prepared cases and augment them with seeded, stateless ops.

Only the tf.data builders import TensorFlow.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.errors import ImagingError
from dicomnode.imaging.series import load_volume
from dicomnode.inference.card import Label, Preprocessing
from dicomnode.inference.preprocess import (
    apply_intensity,
    prepare_labels,
    prepare_slices,
    resampled_shape,
    resize_bilinear,
    stack_context,
)

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ContentDate",
    "ContentTime",
    "ReferencedSeriesSequence",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "SourceImageSequence",
]


@dataclass(frozen=True)
class CaseRef:
    """One image series and the SEG that labels it (``None`` when it has none)."""

    case_id: str
    series_instance_uid: str
    image_paths: tuple[Path, ...]
    seg_path: Path | None


@dataclass(frozen=True)
class Case:
    """A loaded case: HU slices and a boolean mask per label on the same grid."""

    case_id: str
    hu: npt.NDArray[np.float32]  # (slices, rows, columns)
    mask: npt.NDArray[np.bool_]  # (slices, rows, columns, labels)
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    @property
    def voxel_volume_mm3(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing

    def slice_areas_mm2(self) -> npt.NDArray[np.float64]:
        """Labelled area of each slice and label, (slices, labels), in mm^2."""
        pixel = self.pixel_spacing[0] * self.pixel_spacing[1]
        counts: npt.NDArray[np.integer[Any]] = self.mask.sum(axis=(1, 2))
        return counts.astype(np.float64) * pixel


@dataclass(frozen=True)
class PreparedCase:
    """A case after the bundle's preprocessing: the model's view of it."""

    case_id: str
    image: npt.NDArray[np.float32]  # (slices, h, w), padded
    label: npt.NDArray[np.float32]  # (slices, h, w, labels), 0/1
    target_spacing_mm: float  # in-plane spacing of ``image``


def _referenced_sops(ds: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs a SEG derives from (shared and per-frame functional groups)."""
    uids: set[str] = set()
    for item in ds.get("SourceImageSequence", []):
        uids.add(str(item.ReferencedSOPInstanceUID))
    groups = list(ds.get("SharedFunctionalGroupsSequence", []))
    groups += list(ds.get("PerFrameFunctionalGroupsSequence", []))
    for group in groups:
        for derivation in group.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uids.add(str(source.ReferencedSOPInstanceUID))
    return uids


def scan_folder(root: str | Path) -> list[CaseRef]:
    """Index DICOM files under ``root`` and pair each image series with its SEG.

    A SEG names its source series in ReferencedSeriesSequence; when that is absent, the
    series is found through the SOP instances its frames derive from.  When several SEGs
    label one series, the latest (ContentDate/ContentTime) wins -- a corrected
    segmentation sent back by a reader supersedes the node's own.
    """
    images: dict[str, list[Path]] = defaultdict(list)
    sop_to_series: dict[str, str] = {}
    segs: list[tuple[Path, pydicom.Dataset]] = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError):
            continue
        if "SOPClassUID" not in ds:
            continue
        if ds.SOPClassUID == SEGMENTATION_STORAGE:
            segs.append((path, ds))
        elif ds.get("Modality") in ("CT", "MR", "PT"):
            images[str(ds.SeriesInstanceUID)].append(path)
            sop_to_series[str(ds.SOPInstanceUID)] = str(ds.SeriesInstanceUID)
    labelled: dict[str, tuple[str, Path]] = {}
    for path, seg_ds in segs:
        series = {str(i.SeriesInstanceUID) for i in seg_ds.get("ReferencedSeriesSequence", [])}
        series &= set(images)
        if not series:
            series = {sop_to_series[u] for u in _referenced_sops(seg_ds) if u in sop_to_series}
        if len(series) != 1:
            log.warning(
                "%s: cannot pair SEG with one image series (found %d); skipped", path, len(series)
            )
            continue
        uid = series.pop()
        stamp = f"{seg_ds.get('ContentDate', '')}{seg_ds.get('ContentTime', '')}"
        if uid not in labelled or stamp > labelled[uid][0]:
            labelled[uid] = (stamp, path)
    refs = []
    for uid in sorted(images, key=lambda u: str(images[u][0])):
        seg = labelled.get(uid)
        case_id = images[uid][0].parent.relative_to(root).as_posix() if images[uid] else uid
        refs.append(CaseRef(case_id, uid, tuple(images[uid]), seg[1] if seg else None))
    return refs


def _segment_for_label(seg: Any, label: Label) -> list[int]:
    """Segment numbers whose segmented property type matches the label's type or finding."""
    wanted = {(c.value, c.scheme) for c in (label.segment_type, label.finding) if c is not None}
    numbers = []
    for number in seg.segment_numbers:
        t = seg.get_segment_description(number).segmented_property_type
        if (t.value, t.scheme_designator) in wanted:
            numbers.append(number)
    return numbers


def read_label_mask(
    seg_path: Path, sop_instance_uids: Sequence[str], labels: Sequence[Label]
) -> npt.NDArray[np.bool_]:
    """(slices, rows, columns, labels) mask of a SEG on the grid of the given instances.

    Segments are matched to labels by their segmented property type (the label's
    ``segment_type`` or ``finding`` code); a single-segment SEG labels a single-label recipe
    whatever its code.  Source instances without a frame are empty.
    """
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    channels = []
    for label in labels:
        numbers = _segment_for_label(seg, label)
        if not numbers and len(labels) == 1 and len(seg.segment_numbers) == 1:
            numbers = list(seg.segment_numbers)
        if not numbers:
            raise ImagingError(f"{seg_path}: no segment matches label {label.name!r}")
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(sop_instance_uids),
            segment_numbers=numbers,
            combine_segments=False,
            assert_missing_frames_are_empty=True,
        )
        channels.append(np.any(pixels > 0, axis=-1))
    return np.stack(channels, axis=-1)


def load_case(ref: CaseRef, labels: Sequence[Label]) -> Case:
    """Load a series as HU and its labels on the same grid (all-empty without a SEG)."""
    volume = load_volume(ref.image_paths)
    if ref.seg_path is None:
        mask = np.zeros((*volume.shape, len(labels)), dtype=bool)
    else:
        mask = read_label_mask(ref.seg_path, volume.sop_instance_uids, labels)
    hu = np.asarray(volume.pixels, dtype=np.float32)  # int16 for most CT; training wants float
    return Case(ref.case_id, hu, mask, volume.pixel_spacing, volume.slice_spacing)


def load_cases(
    root: str | Path, labels: Sequence[Label], *, unlabelled: str = "skip"
) -> list[Case]:
    """Load every case under ``root``; series without a SEG are skipped or kept as negative."""
    refs = scan_folder(root)
    if unlabelled == "skip":
        refs = [r for r in refs if r.seg_path is not None]
    if not refs:
        raise ImagingError(f"{root}: no labelled image series found")
    return [load_case(r, labels) for r in refs]


def soft_labels(
    mask: npt.ArrayLike, pixel_spacing: tuple[float, float], spec: Preprocessing
) -> npt.NDArray[np.float32]:
    """A binary (N, H, W) mask resampled exactly as :func:`prepare_slices` resamples the
    image, but not thresholded: each model pixel holds the part of it the label covers
    (0..1), the same linear map the lesion's contrast goes through in the image."""
    arr = np.asarray(mask, dtype=np.float32)
    rows, cols = resampled_shape((int(arr.shape[1]), int(arr.shape[2])), pixel_spacing, spec)
    m = spec.pad_multiple
    out = np.zeros((arr.shape[0], -(-rows // m) * m, -(-cols // m) * m), dtype=np.float32)
    out[:, :rows, :cols] = resize_bilinear(arr, (rows, cols))
    return out


def prepare_case(case: Case, spec: Preprocessing, *, soft: bool = False) -> PreparedCase:
    """Apply the bundle preprocessing (the runtime's own functions) to image and labels;
    ``soft`` keeps the resampled labels' partial coverage (:func:`soft_labels`)."""
    image, _ = prepare_slices(case.hu, case.pixel_spacing, spec)
    resample = soft_labels if soft else prepare_labels
    label = np.stack(
        [resample(case.mask[..., c], case.pixel_spacing, spec) for c in range(case.mask.shape[-1])],
        axis=-1,
    )
    target = spec.target_spacing_mm or case.pixel_spacing[0]
    return PreparedCase(case.case_id, image, label, float(target))


def context_stack(image: npt.NDArray[np.float32], context: int) -> npt.NDArray[np.float32]:
    """(N, h, w) -> (N, h, w, context): each slice with its neighbours, edges repeated."""
    return np.ascontiguousarray(np.moveaxis(stack_context(image, context), 1, -1))


def fill_value(spec: Preprocessing) -> float:
    """The value :func:`prepare_slices` pads with (the window minimum, normalised)."""
    return float(apply_intensity(np.float32(spec.window_min), spec))


def split_cases(n: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic split of case indices into (train, validation)."""
    order = np.random.default_rng([seed, 3]).permutation(n)
    n_val = max(1, round(n * validation_fraction)) if n > 1 else 0
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _crop(arr: npt.NDArray[Any], top: int, left: int, size: int, fill: float) -> npt.NDArray[Any]:
    """``arr[..., top:top+size, left:left+size, ...]`` on axes 1-2, padded with ``fill``."""
    out = np.full((arr.shape[0], size, size, *arr.shape[3:]), fill, dtype=arr.dtype)
    h, w = arr.shape[1:3]
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + size, h), min(left + size, w)
    if r1 > r0 and c1 > c0:
        out[:, r0 - top : r1 - top, c0 - left : c1 - left] = arr[:, r0:r1, c0:c1]
    return out


def lesion_voxels(
    cases: Sequence[PreparedCase],
) -> list[tuple[int, npt.NDArray[np.intp]]]:
    """(case index, (n, 3) voxel coordinates) of each connected labelled region (26-connected,
    any label, label >= 0.5), in case order."""
    from dicomnode.models.metrics import label_components

    out = []
    for ci, case in enumerate(cases):
        labels, n = label_components(case.label.max(axis=-1) >= 0.5)
        if not n:
            continue
        flat = labels.ravel()
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], np.arange(1, n + 2))
        for i in range(n):
            idx = order[starts[i] : starts[i + 1]]
            out.append((ci, np.stack(np.unravel_index(idx, labels.shape), axis=-1)))
    return out


class PatchSampler:
    """Draws (image patch, target) pairs from prepared cases with positive oversampling.

    Segmentation targets are the label patch (size, size, labels); classification targets
    are one 0/1 per label: positive when the patch holds at least ``min_area_mm2`` of it.
    Patches with a smaller, non-zero area are ambiguous and drawn again.  ``patch_size`` 0
    means whole slices, exactly as :func:`prepare_slices` gives them, padded (bottom and
    right, with ``fill``) to the largest slice of the set.
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        *,
        task: str,
        patch_size: int,
        context: int,
        positive_fraction: float,
        min_area_mm2: float,
        fill: float,
        positive_sampling: str = "voxel",
    ) -> None:
        self.cases = list(cases)
        self.task = task
        self.whole_slices = not patch_size
        self.size = patch_size or max(max(c.image.shape[1:3]) for c in self.cases)
        self.context = context
        self.positive_fraction = positive_fraction
        self.fill = fill
        self.min_area_px = [min_area_mm2 / c.target_spacing_mm**2 for c in self.cases]
        self.positives = [np.argwhere(c.label.max(axis=-1) >= 0.5) for c in self.cases]
        self.with_positives = [i for i, p in enumerate(self.positives) if len(p)]
        self.by_lesion = positive_sampling == "lesion"
        #: (case index, voxel coordinates) of every connected lesion, for "lesion" sampling
        self.lesions = lesion_voxels(self.cases) if self.by_lesion else []
        self.labels = self.cases[0].label.shape[-1]

    def _patch(self, ci: int, k: int, top: int, left: int) -> tuple[npt.NDArray[np.float32], ...]:
        case = self.cases[ci]
        half = self.context // 2
        ks = np.clip(np.arange(k - half, k + half + 1), 0, case.image.shape[0] - 1)
        x = _crop(case.image[ks], top, left, self.size, self.fill)
        x = np.moveaxis(x, 0, -1)
        y = _crop(case.label[k : k + 1], top, left, self.size, 0.0)[0]
        return x.astype(np.float32), y.astype(np.float32)

    def sample(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.float32], ...]:
        while True:
            if self.with_positives and rng.uniform() < self.positive_fraction:
                if self.by_lesion:
                    ci, voxels = self.lesions[int(rng.integers(len(self.lesions)))]
                    k, r, c = voxels[rng.integers(len(voxels))]
                else:
                    ci = int(rng.choice(self.with_positives))
                    k, r, c = self.positives[ci][rng.integers(len(self.positives[ci]))]
                jitter = rng.integers(-self.size // 4, self.size // 4 + 1, size=2)
                top, left = r - self.size // 2 + jitter[0], c - self.size // 2 + jitter[1]
                if self.whole_slices:
                    top = left = 0
            elif self.whole_slices:
                ci = int(rng.integers(len(self.cases)))
                k, top, left = int(rng.integers(self.cases[ci].image.shape[0])), 0, 0
            else:
                ci = int(rng.integers(len(self.cases)))
                n, h, w = self.cases[ci].image.shape
                k = int(rng.integers(n))
                top = int(rng.integers(min(0, h - self.size), max(0, h - self.size) + 1))
                left = int(rng.integers(min(0, w - self.size), max(0, w - self.size) + 1))
            x, y = self._patch(ci, int(k), int(top), int(left))
            if self.task == "segmentation":
                return x, y
            area = y.sum(axis=(0, 1))
            if np.any((area > 0) & (area < self.min_area_px[ci])):
                continue
            return x, (area > 0).astype(np.float32)

    def iterate(self, seed: int) -> Iterator[tuple[npt.NDArray[np.float32], ...]]:
        rng = np.random.default_rng([seed, 2])
        while True:
            yield self.sample(rng)

    def target_shape(self) -> tuple[int, ...]:
        if self.task == "segmentation":
            return (self.size, self.size, self.labels)
        return (self.labels,)


def augment(x: Any, y: Any, seed: Any, *, task: str, data: Any, fill: float) -> tuple[Any, Any]:
    """Flips, a small rotation and intensity jitter, stateless in ``seed`` (shape (2,))."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 6)
    seg = task == "segmentation"
    channels = tf.shape(x)[-1]
    both = tf.concat([x, y], axis=-1) if seg else x
    if data.flip:
        both = tf.image.stateless_random_flip_left_right(both, seeds[0])
        both = tf.image.stateless_random_flip_up_down(both, seeds[1])
    if data.rotation_deg > 0:
        limit = float(np.deg2rad(data.rotation_deg))
        angle = tf.random.stateless_uniform([], seeds[2], -limit, limit)
        size = tf.cast(tf.shape(both)[0:2], tf.float32)
        cy, cx = (size[0] - 1) / 2, (size[1] - 1) / 2
        cos, sin = tf.cos(angle), tf.sin(angle)
        transform = tf.stack(
            [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
        )
        # Shift so the constant fill of the image channels is ``fill`` and labels get 0.
        shift = tf.concat(
            [tf.fill([channels], fill), tf.zeros([tf.shape(both)[-1] - channels])], axis=0
        )
        rotated = tf.raw_ops.ImageProjectiveTransformV3(
            images=(both - shift)[None],
            transforms=transform[None],
            output_shape=tf.shape(both)[0:2],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )[0]
        both = rotated + shift
    if seg:
        x, y = both[..., :channels], both[..., channels:]
        if not data.soft_labels:
            y = tf.cast(y >= 0.5, tf.float32)
    else:
        x = both
    if data.intensity_jitter > 0:
        j = data.intensity_jitter
        scale = 1.0 + tf.random.stateless_uniform([], seeds[3], -j, j)
        offset = tf.random.stateless_uniform([], seeds[4], -j, j)
        x = x * scale + offset
    if data.noise_std > 0:
        x = x + tf.random.stateless_normal(tf.shape(x), seeds[5], stddev=data.noise_std)
    return x, y


def training_dataset(sampler: PatchSampler, recipe: Any, seed: int) -> Any:
    """Infinite, deterministic tf.data stream of augmented batches."""
    import tensorflow as tf

    size, ctx = sampler.size, sampler.context
    ds = tf.data.Dataset.from_generator(
        lambda: sampler.iterate(seed),
        output_signature=(
            tf.TensorSpec((size, size, ctx), tf.float32),
            tf.TensorSpec(sampler.target_shape(), tf.float32),
        ),
    )
    fill = sampler.fill

    def _aug(i: Any, xy: Any) -> Any:
        return augment(
            xy[0],
            xy[1],
            tf.stack([tf.constant(seed, tf.int64), i]),
            task=recipe.task,
            data=recipe.data,
            fill=fill,
        )

    ds = ds.enumerate().map(_aug, num_parallel_calls=1, deterministic=True)
    return ds.batch(recipe.data.batch_size, drop_remainder=True).prefetch(2)


def validation_arrays(
    cases: Sequence[PreparedCase],
    *,
    task: str,
    context: int,
    slices_per_case: int,
    min_area_mm2: float,
    fill: float,
    seed: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Fixed validation slices (half with labels where possible), whole, padded to one shape."""
    rng = np.random.default_rng([seed, 4])
    size_h = max(c.image.shape[1] for c in cases)
    size_w = max(c.image.shape[2] for c in cases)
    xs, ys = [], []
    for case in cases:
        area = case.label.sum(axis=(1, 2)) * case.target_spacing_mm**2  # (N, labels)
        ambiguous = np.any((area > 0) & (area < min_area_mm2), axis=1)
        pos = np.flatnonzero(np.any(area > 0, axis=1) & ~ambiguous)
        neg = np.flatnonzero(~np.any(area > 0, axis=1))
        n_pos = min(len(pos), slices_per_case // 2)
        pick = list(rng.choice(pos, n_pos, replace=False)) if n_pos else []
        pick += list(rng.choice(neg, min(len(neg), slices_per_case - n_pos), replace=False))
        stack = context_stack(case.image, context)
        for k in sorted(int(i) for i in pick):
            x = np.full((size_h, size_w, context), fill, np.float32)
            x[: stack.shape[1], : stack.shape[2]] = stack[k]
            xs.append(x)
            if task == "segmentation":
                y = np.zeros((size_h, size_w, case.label.shape[-1]), np.float32)
                y[: case.label.shape[1], : case.label.shape[2]] = case.label[k]
            else:
                y = (area[k] > 0).astype(np.float32)
            ys.append(y)
    return np.stack(xs), np.stack(ys)


def slice_dataset(case: PreparedCase, context: int, batch_size: int = 8) -> Any:
    """A case's slices, unaugmented and in order, as the model sees them (NHWC batches)."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(context_stack(case.image, context)).batch(batch_size)
