"""Key slices of a SEG over its CT, rendered as PNG on the server (numpy + Pillow).

Each picture carries what a reader needs to trust it: the segments' legend, orientation
letters at the four edges (from Image Orientation (Patient), patient LPS axes, PS3.3
C.7.6.2.1.1), a scale bar (from Pixel Spacing) and the window/level it was drawn with.
A key slice is the source image where a segment covers the most pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset, dcmread
from pydicom.pixels.processing import apply_modality_lut

#: Segment colours by segment number (1-based, cycled): distinct on grey.
PALETTE = (
    (255, 64, 64),
    (64, 200, 255),
    (255, 210, 0),
    (80, 230, 80),
    (230, 90, 255),
    (255, 140, 0),
)
#: Soft-tissue window (centre, width) when an image names none.
DEFAULT_WINDOW = (40.0, 400.0)
MIN_SIZE = 384
SCALE_BARS_MM = (5, 10, 20, 50, 100, 200)

Mask = npt.NDArray[np.bool_]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass(frozen=True)
class Segment:
    number: int
    label: str

    @property
    def color(self) -> tuple[int, int, int]:
        return PALETTE[(self.number - 1) % len(PALETTE)]


@dataclass(frozen=True)
class SegmentFrame:
    """One SEG frame: the segment it shows, the source image (and frame) it lies on."""

    segment: int
    sop_instance_uid: str
    frame: int | None
    mask: Mask


@dataclass
class Segmentation:
    segments: dict[int, Segment] = field(default_factory=dict)
    frames: list[SegmentFrame] = field(default_factory=list)


@dataclass(frozen=True)
class KeySlice:
    """A source image (and frame) to draw, with the segments that lie on it."""

    sop_instance_uid: str
    frame: int | None
    segments: tuple[int, ...]


def read_segmentation(path: Path) -> Segmentation:
    """Segments and frames of a SEG (binary or fractional; fractional > 0 counts)."""
    ds = dcmread(path)
    seg = Segmentation()
    for item in ds.SegmentSequence:
        seg.segments[int(item.SegmentNumber)] = Segment(
            int(item.SegmentNumber), str(item.get("SegmentLabel", ""))
        )
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        # one segment (or one source image): highdicom shares what all frames have in common
        ident = (
            group.get("SegmentIdentificationSequence") or shared[0].SegmentIdentificationSequence
        )
        number = int(ident[0].ReferencedSegmentNumber)
        derivation = group.get("DerivationImageSequence") or shared[0].get(
            "DerivationImageSequence"
        )
        if not derivation:
            continue  # without a source reference there is nothing to draw it over
        source = derivation[0].SourceImageSequence[0]
        frame = source.get("ReferencedFrameNumber")
        seg.frames.append(
            SegmentFrame(
                number,
                str(source.ReferencedSOPInstanceUID),
                None if frame is None else int(frame),
                pixels[i] > 0,
            )
        )
    return seg


def key_slices(seg: Segmentation, limit: int = 6) -> list[KeySlice]:
    """Per segment, the source image where it is largest (one picture per image)."""
    chosen: dict[tuple[str, int | None], None] = {}
    for number in sorted(seg.segments):
        frames = [f for f in seg.frames if f.segment == number and f.mask.any()]
        if frames:
            best = max(frames, key=lambda f: int(f.mask.sum()))
            chosen[(best.sop_instance_uid, best.frame)] = None
    slices = []
    for sop, frame in list(chosen)[:limit]:
        on = {f.segment for f in seg.frames if (f.sop_instance_uid, f.frame) == (sop, frame)}
        slices.append(KeySlice(sop, frame, tuple(sorted(on))))
    return slices


def _shared(ds: Dataset, sequence: str, keyword: str) -> object:
    """``keyword`` from the dataset, else from its shared functional group ``sequence``."""
    if keyword in ds:
        return ds.get(keyword)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        return shared[0][sequence][0].get(keyword)
    return None


def _hounsfield(ds: Dataset, frame: int | None) -> npt.NDArray[np.float64]:
    pixels = np.asarray(ds.pixel_array)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[(frame or 1) - 1]
        slope = _shared(ds, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _shared(ds, "PixelValueTransformationSequence", "RescaleIntercept")
        scaled = pixels * float(slope or 1.0) + float(intercept or 0.0)  # type: ignore[arg-type]
        return np.asarray(scaled, dtype=np.float64)
    return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)


def window_of(ds: Dataset) -> tuple[float, float]:
    """The image's first window (centre, width), else :data:`DEFAULT_WINDOW`."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return DEFAULT_WINDOW
    first = [
        v[0] if isinstance(v, Sequence) and not isinstance(v, str) else v for v in (centre, width)
    ]
    return float(first[0]), float(first[1])


def orientation_letter(direction: Sequence[float]) -> str:
    """Patient-axis letters a direction points to (LPS: +x left, +y posterior, +z head),
    strongest first; components under 0.25 are left out."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    order = sorted(range(3), key=lambda i: -abs(direction[i]))
    return "".join(letters[i][direction[i] > 0] for i in order if abs(direction[i]) >= 0.25)


def edge_letters(orientation: Sequence[float]) -> dict[str, str]:
    """Letters for the left, right, top and bottom edges of an image with this IOP."""
    row, col = [float(v) for v in orientation[:3]], [float(v) for v in orientation[3:6]]
    return {
        "right": orientation_letter(row),
        "left": orientation_letter([-v for v in row]),
        "bottom": orientation_letter(col),
        "top": orientation_letter([-v for v in col]),
    }


def scale_bar_mm(width_mm: float) -> int:
    """The largest round length that fits in a quarter of the image width."""
    fitting = [mm for mm in SCALE_BARS_MM if mm <= width_mm / 4]
    return fitting[-1] if fitting else SCALE_BARS_MM[0]


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _outline(mask: Mask) -> Mask:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Font) -> None:
    draw.text(xy, text, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def _grey(values: npt.NDArray[np.float64], window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    centre, width = window
    low = centre - width / 2
    scaled = np.clip((values - low) / max(width, 1.0), 0.0, 1.0) * 255.0
    return scaled.astype(np.uint8)


def render_key_slice(
    source: Path,
    key: KeySlice,
    seg: Segmentation,
    window: tuple[float, float] | None = None,
) -> bytes:
    """The source image of ``key`` with its segments drawn over it, as PNG bytes."""
    ds = dcmread(source)
    window = window or window_of(ds)
    grey = _grey(_hounsfield(ds, key.frame), window)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=2).astype(np.float64)
    for frame in seg.frames:
        if (frame.sop_instance_uid, frame.frame) != (key.sop_instance_uid, key.frame):
            continue
        if frame.mask.shape != grey.shape:
            continue
        colour = np.array(seg.segments[frame.segment].color, dtype=np.float64)
        rgb[frame.mask] = rgb[frame.mask] * 0.6 + colour * 0.4
        rgb[_outline(frame.mask)] = colour
    factor = max(1, math.ceil(MIN_SIZE / max(grey.shape)))
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    _annotate(image, ds, key, seg, window, factor)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _annotate(
    image: Image.Image,
    ds: Dataset,
    key: KeySlice,
    seg: Segmentation,
    window: tuple[float, float],
    factor: int,
) -> None:
    draw = ImageDraw.Draw(image)
    font = _font(14)
    w, h = image.size
    _text(draw, (8, 6), f"W {window[1]:g}  L {window[0]:g}", font)
    y = 6
    for number in key.segments:
        segment = seg.segments[number]
        label = segment.label or f"segment {number}"
        size = draw.textbbox((0, 0), label, font=font)
        x = w - 8 - (size[2] - size[0]) - 18
        draw.rectangle((x, y + 2, x + 12, y + 14), fill=segment.color, outline=(0, 0, 0))
        _text(draw, (x + 18, y), label, font)
        y += 18
    orientation = _shared(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:  # type: ignore[arg-type]
        letters = edge_letters(orientation)  # type: ignore[arg-type]
        big = _font(18)
        _text(draw, (6, h / 2 - 9), letters["left"], big)
        _text(draw, (w - 8 - 12 * len(letters["right"]), h / 2 - 9), letters["right"], big)
        _text(draw, (w / 2 - 6, 26), letters["top"], big)
        _text(draw, (w / 2 - 6, h - 26), letters["bottom"], big)
    spacing = _shared(ds, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is not None:
        column_mm = float(spacing[1])  # type: ignore[index]
        mm = scale_bar_mm(column_mm * ds.Columns)
        length = mm / column_mm * factor
        x0, y0 = 10, h - 14
        draw.rectangle((x0, y0, x0 + length, y0 + 4), fill=(255, 255, 255), outline=(0, 0, 0))
        _text(draw, (x0, y0 - 20), f"{mm} mm", font)


#: Media types of rendered frames (WADO-RS, PS3.18 8.3.5.1) and their Pillow formats.
RENDERED_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG"}


def render_frame(path: Path, frame: int, media_type: str = "image/png") -> bytes:
    """One frame of an image as PNG or JPEG: greyscale images through their modality LUT
    and first window (else :data:`DEFAULT_WINDOW`), colour images as they are.

    ``frame`` is 1-based; raises :class:`IndexError` for a frame the image does not have
    and :class:`ValueError` for an object without pixels."""
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("the instance has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise IndexError(f"frame {frame} is out of range (the instance has {frames})")
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        pixels = np.asarray(ds.pixel_array)
        rgb = pixels[frame - 1] if frames > 1 else pixels
        image = Image.fromarray(np.asarray(rgb, dtype=np.uint8), "RGB")
    else:
        grey = _grey(_hounsfield(ds, frame), window_of(ds))
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            grey = 255 - grey
        image = Image.fromarray(grey, "L")
    out = io.BytesIO()
    image.save(out, format=RENDERED_FORMATS[media_type])
    return out.getvalue()


@dataclass(frozen=True)
class HeatMapFrame:
    """The hottest frame of a heat map (Parametric Map): probabilities on a source image."""

    sop_instance_uid: str
    frame: int | None
    probabilities: npt.NDArray[np.float64]
    explanation: str


def read_heat_map(path: Path) -> HeatMapFrame:
    """The frame of a Parametric Map with the most heat (the largest sum of its values),
    as real-world values (its Real World Value Mapping's slope and intercept), with the
    source image it lies on."""
    ds = dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = ds.PerFrameFunctionalGroupsSequence
    hottest = int(np.argmax(pixels.reshape(len(pixels), -1).sum(axis=1, dtype=np.float64)))
    group = frames[hottest]
    mappings = group.get("RealWorldValueMappingSequence") or shared.RealWorldValueMappingSequence
    mapping = mappings[0]
    derivation = group.get("DerivationImageSequence") or shared.DerivationImageSequence
    source = derivation[0].SourceImageSequence[0]
    number = source.get("ReferencedFrameNumber")
    values = pixels[hottest] * float(mapping.RealWorldValueSlope) + float(
        mapping.RealWorldValueIntercept
    )
    return HeatMapFrame(
        str(source.ReferencedSOPInstanceUID),
        None if number is None else int(number),
        np.asarray(values, dtype=np.float64),
        str(mapping.get("LUTExplanation", "")),
    )


def heat_colours(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A heat ramp for probabilities 0..1: dark red, red, orange, yellow (never white or
    grey, so it stands out on CT)."""
    p = np.clip(p, 0.0, 1.0)[..., np.newaxis]
    stops = np.array([[96, 0, 0], [255, 0, 0], [255, 140, 0], [255, 240, 0]], dtype=np.float64)
    x = p * (len(stops) - 1)
    low = np.clip(np.floor(x).astype(int), 0, len(stops) - 2)
    t = x - low
    colours: npt.NDArray[np.float64] = stops[low[..., 0]] * (1 - t) + stops[low[..., 0] + 1] * t
    return colours


def render_heat_map(
    source: Path, heat: HeatMapFrame, window: tuple[float, float] | None = None
) -> bytes:
    """The source image with the heat map blended over it (probabilities below 0.05 are
    left clear), a colour bar 0..1 and the map's explanation, as PNG bytes."""
    ds = dcmread(source)
    window = window or window_of(ds)
    grey = _grey(_hounsfield(ds, heat.frame), window)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=2).astype(np.float64)
    if heat.probabilities.shape == grey.shape:
        alpha = np.where(heat.probabilities >= 0.05, 0.35 + 0.4 * heat.probabilities, 0.0)
        alpha = alpha[..., np.newaxis]
        rgb = rgb * (1 - alpha) + heat_colours(heat.probabilities) * alpha
    factor = max(1, math.ceil(MIN_SIZE / max(grey.shape)))
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    font = _font(14)
    w, h = image.size
    _text(draw, (8, 6), f"W {window[1]:g}  L {window[0]:g}", font)
    _text(draw, (8, h - 24), heat.explanation or "heat map", font)
    bar = heat_colours(np.linspace(1.0, 0.0, 100)).astype(np.uint8)
    strip = Image.fromarray(np.repeat(bar[:, np.newaxis, :], 12, axis=1), "RGB")
    image.paste(strip, (w - 24, 28))
    _text(draw, (w - 44, 8), "1.0", font)
    _text(draw, (w - 44, 130), "0.0", font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def read_key_images(path: Path) -> list[str]:
    """The lines of a Key Object Selection's description (113012, DCM, "Key Object
    Description"): one per finding, ``lesion 1: image 12 (slice 12 of 40), ...``."""
    ds = dcmread(path)
    for item in ds.get("ContentSequence", []):
        concept = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "TEXT" and concept and concept[0].CodeValue == "113012":
            return [line for line in str(item.TextValue).splitlines() if ": image" in line]
    return []
