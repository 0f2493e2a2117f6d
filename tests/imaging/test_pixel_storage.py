"""A volume's pixels: int16 where the rescaled values allow it, float32 otherwise, same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.valuerep import DSfloat

from dicomnode.imaging.series import load_volume, volume_from_datasets
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

SMALL = PhantomSpec(rows=32, columns=32, slices=4, n_lesions=0)


def test_ct_in_hounsfield_units_is_kept_as_int16(tmp_path: Path) -> None:
    # Given a CT series (integer stored values, slope 1, intercept -1024)
    phantom = generate_phantom(PhantomSpec(slices=12, seed=3))

    # When loaded from its files
    volume = load_volume(write_phantom(phantom, tmp_path / "ct"))

    # Then the volume is int16 (half of float32's memory) with the same Hounsfield units
    assert volume.pixels.dtype == np.int16
    np.testing.assert_array_equal(volume.pixels.astype(np.float32), phantom.hu)


def test_a_fractional_rescale_gives_float32_with_exact_values() -> None:
    # Given slices whose rescale makes fractions
    phantom = generate_phantom(SMALL)
    for ds in phantom.datasets:
        ds.RescaleSlope = DSfloat(0.5, auto_format=True)

    # When built
    volume = volume_from_datasets(phantom.datasets)

    # Then the volume is float32 and every value is slope * stored + intercept
    assert volume.pixels.dtype == np.float32
    np.testing.assert_array_equal(volume.pixels, (phantom.hu + 1024) * 0.5 - 1024)


def test_values_beyond_int16_give_float32() -> None:
    # Given slices whose rescaled values exceed int16's range
    phantom = generate_phantom(SMALL)
    for ds in phantom.datasets:
        ds.RescaleSlope = DSfloat(100, auto_format=True)

    # When built
    volume = volume_from_datasets(phantom.datasets)

    # Then the volume is float32 with the exact values
    assert volume.pixels.dtype == np.float32
    np.testing.assert_array_equal(volume.pixels, (phantom.hu + 1024) * 100 - 1024)


def test_one_slice_that_needs_float_turns_the_whole_volume_to_float32() -> None:
    # Given integer slices but the last, whose intercept is a fraction
    phantom = generate_phantom(SMALL)
    phantom.datasets[-1].RescaleIntercept = DSfloat(-1024.5, auto_format=True)

    # When built
    volume = volume_from_datasets(phantom.datasets)

    # Then the slices read before it kept their values through the change to float32
    assert volume.pixels.dtype == np.float32
    expected = phantom.hu.copy()
    expected[-1] -= 0.5
    np.testing.assert_array_equal(volume.pixels, expected)


def test_full_range_unsigned_data_shifted_into_int16_stays_exact() -> None:
    # Given 16-bit unsigned slices using all of 0..65535, with an intercept of -32768
    phantom = generate_phantom(SMALL)
    stored = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)
    for ds in phantom.datasets:
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = stored.tobytes()
        ds.RescaleIntercept = DSfloat(-32768, auto_format=True)

    # When built
    volume = volume_from_datasets(phantom.datasets)

    # Then every value is int16's, exactly (no wrap-around on the way)
    assert volume.pixels.dtype == np.int16
    expected = stored.astype(np.int32) - 32768
    for k in range(volume.shape[0]):
        np.testing.assert_array_equal(volume.pixels[k], expected)
