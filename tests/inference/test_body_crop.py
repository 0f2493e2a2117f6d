"""Less work for the same result: segmentation on the body's box, resizing in place."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dicomnode.config import builtin_bundle
from dicomnode.inference.card import Bundle, Preprocessing, load_bundle
from dicomnode.inference.preprocess import (
    _taps,
    apply_intensity,
    body_box,
    prepare_slices,
    resize_bilinear,
)
from dicomnode.inference.runner import BODY_MARGIN, BundleRunner, ProviderChoice
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom

SPEC = Preprocessing(window_min=-1000.0, window_max=400.0, target_spacing_mm=1.0)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(builtin_bundle("lesion-seg"))


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """A 200 x 200 field of view of 1.4 mm (280 mm) around a 320 x 230 mm body: the body
    fills the width and leaves air above and below it; two small lesions."""
    spec = PhantomSpec(
        rows=256, columns=256, slices=12, seed=9, n_lesions=2, lesion_radius_mm=(3.0, 5.0)
    )
    return generate_phantom(spec)


def recorded_inputs(runner: BundleRunner) -> list[tuple[int, ...]]:
    """The shapes of every batch the runner's session runs from now on."""
    shapes: list[tuple[int, ...]] = []
    real = runner.session

    class Recording:
        def run(self, names: list[str], feed: dict[str, Any]) -> list[Any]:
            shapes.append(next(iter(feed.values())).shape)
            return real.run(names, feed)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    runner.session = Recording()
    return shapes


def test_the_box_holds_every_body_pixel_with_the_margin_on_the_stride_grid() -> None:
    # Given prepared slices of air with a body from rows 37-60 and columns 21-90 on one slice
    hu = np.full((3, 128, 112), -1000, dtype=np.int16)
    hu[1, 37:61, 21:91] = 40
    hu[2, 50, 50] = -400  # inside the box already
    x, _ = prepare_slices(hu, (1.0, 1.0), SPEC)
    # When its box is found with a margin of 8 on a grid of 16
    rows, cols = body_box(x, SPEC, margin=8, multiple=16) or (None, None)
    # Then it starts and ends on the grid and holds the body and the margin
    assert (rows, cols) == (slice(16, 80), slice(0, 112))
    rows, cols = body_box(x, SPEC, margin=0, multiple=16) or (None, None)
    assert (rows, cols) == (slice(32, 64), slice(16, 96))


def test_air_gives_an_empty_box_and_a_window_above_minus_500_no_box() -> None:
    air = np.zeros((2, 32, 32), dtype=np.float32)  # -1000 HU, windowed and normalised
    assert body_box(air, SPEC, margin=16, multiple=16) == (slice(0, 0), slice(0, 0))
    soft = Preprocessing(window_min=-160.0, window_max=240.0)
    x = apply_intensity(np.full((2, 32, 32), 40.0, dtype=np.float32), soft)
    assert body_box(x, soft, margin=16, multiple=16) is None


def test_the_masks_are_those_of_the_whole_field_of_view_with_less_run(
    bundle: Bundle, phantom: Phantom
) -> None:
    # Given the shipped segmentation model, once on the body's box and once on everything
    cropped = BundleRunner(bundle, ("cpu",), batch_size=4)
    whole = BundleRunner(bundle, ("cpu",), batch_size=4, crop_to_body=False)
    shapes = recorded_inputs(cropped)
    # When both segment the phantom
    hu, spacing = phantom.hu, phantom.spec.pixel_spacing
    a = cropped.predict_segmentation(hu, spacing)
    b = whole.predict_segmentation(hu, spacing)
    # Then the masks are the same, and it found both lesions
    label = bundle.card.labels[0]
    assert np.array_equal(a[0] >= label.threshold, b[0] >= label.threshold)
    mask = a[0] >= label.threshold
    assert 2 * (mask & phantom.mask).sum() / (mask.sum() + phantom.mask.sum()) > 0.85
    # and the model ran on the body's rows only (the body fills the width)
    x, _ = prepare_slices(hu, spacing, bundle.card.preprocessing)
    box = body_box(x, bundle.card.preprocessing, margin=BODY_MARGIN, multiple=16)
    assert box is not None
    rows, cols = box
    assert {s[2:] for s in shapes} == {(rows.stop - rows.start, cols.stop - cols.start)}
    assert rows.stop - rows.start < x.shape[1] - 32
    # and the probabilities differ little anywhere (the network's borders moved)
    assert np.abs(a - b).max() < 0.02


def test_a_slab_of_air_runs_nothing_and_a_gpu_runs_everything(bundle: Bundle) -> None:
    hu = np.full((4, 96, 96), -1000.0, dtype=np.float32)
    runner = BundleRunner(bundle, ("cpu",), batch_size=4)
    shapes = recorded_inputs(runner)
    probs = runner.predict_segmentation(hu, (1.0, 1.0))
    assert probs.shape == (1, 4, 96, 96) and not probs.any() and shapes == []
    # On a GPU (a box that changes from slab to slab would make it plan each new shape)
    runner.choice = ProviderChoice(("CUDAExecutionProvider",), ("CUDAExecutionProvider",))
    runner.predict_segmentation(hu, (1.0, 1.0))
    assert shapes == [(4, 1, 96, 96)]


@pytest.mark.parametrize("shape", [(358, 358), (256, 256), (70, 90), (512, 512)])
def test_resizing_in_place_gives_the_two_tap_formula_bit_for_bit(shape: tuple[int, int]) -> None:
    # (the reused buffers of resize_bilinear against the formula written out)
    src = np.random.default_rng(3).uniform(-1, 1, (3, 512, 480)).astype(np.float32)
    y0, y1, wy = _taps(512, shape[0])
    x0, x1, wx = _taps(480, shape[1])
    rows = src[:, y0] + (src[:, y1] - src[:, y0]) * wy[:, None]
    expected = rows[:, :, x0] + (rows[:, :, x1] - rows[:, :, x0]) * wx
    got = resize_bilinear(src, shape)
    assert np.array_equal(got, expected)
