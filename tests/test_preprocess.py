"""Preprocessing and coordinate conventions (torch-free runtime module)."""

import numpy as np
import pytest

from usn_offline.runtime.preprocess import (
    PreprocessConfig,
    normalised_to_pixels,
    pixels_to_normalised,
    preprocess,
    scale_keypoints,
    to_gray_float,
)


def test_normalised_coordinates_span_the_image_edges():
    edges = np.array([[-0.5, -0.5], [63.5, 31.5]])
    np.testing.assert_allclose(pixels_to_normalised(edges, 32, 64), [[-1, -1], [1, 1]])
    pts = np.random.default_rng(0).uniform(-0.5, 63.5, size=(10, 2))
    np.testing.assert_allclose(normalised_to_pixels(pixels_to_normalised(pts, 64, 64), 64, 64), pts)


def test_scale_keypoints_matches_the_pixel_grid():
    # Pixel (1, 1) of a 4x4 image covers pixels (2..3, 2..3) of an 8x8 one: centre 2.5.
    np.testing.assert_allclose(scale_keypoints(np.array([1.0, 1.0]), (4, 4), (8, 8)), [2.5, 2.5])


@pytest.mark.parametrize("dtype,maxval", [(np.uint8, 255), (np.uint16, 65535)])
def test_gray_conversion_scales_by_dtype(dtype, maxval):
    img = np.full((4, 4), maxval // 2, dtype=dtype)
    assert to_gray_float(img).max() == pytest.approx(0.5, abs=0.01)


def test_rgb_and_rgba_use_luma_weights():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 1] = 255
    assert to_gray_float(rgb)[0, 0] == pytest.approx(0.587, abs=1e-6)
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 7, np.uint8)], axis=2)
    np.testing.assert_allclose(to_gray_float(rgba), to_gray_float(rgb))


def test_preprocess_resizes_to_the_input_size():
    out = preprocess(np.zeros((480, 640, 3), np.uint8), PreprocessConfig(64, 64))
    assert out.shape == (64, 64) and out.dtype == np.float32


def test_unsupported_channel_count():
    with pytest.raises(ValueError, match="channel count 2"):
        to_gray_float(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.parametrize("shape,dtype", [
    ((480, 640, 3), np.uint8), ((480, 640), np.uint8), ((480, 640, 4), np.uint8), ((480, 640), np.uint16),
    ((720, 1280, 3), np.uint8), ((64, 640, 1), np.uint8), ((480, 700, 3), np.uint8), ((40, 640), np.uint8),
    ((1080, 1920, 3), np.uint8), ((720, 1280), np.uint16), ((481, 643, 4), np.uint8), ((65, 64), np.uint8),
    ((64, 97, 3), np.uint16), ((5000, 70, 3), np.uint8),
])
def test_fast_area_path_equals_the_general_path(shape, dtype):
    from usn_offline.runtime.preprocess import resize_image, to_gray_float

    rng = np.random.default_rng(0)
    frame = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True, dtype=dtype)
    config = PreprocessConfig(64, 64)
    got = preprocess(frame, config)
    expected = resize_image(to_gray_float(frame), config)
    assert got.shape == (64, 64) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-6


def test_fast_area_path_on_padded_rows():
    """A frame whose rows are padded (Image.step > width * channels) is a non-contiguous
    view: it takes the general path, with the same result."""
    from usn_offline.runtime.preprocess import resize_image, to_gray_float

    padded = np.random.default_rng(1).integers(0, 256, (480, 656, 3), dtype=np.uint8)
    frame = padded[:, :640]
    assert not frame.flags.c_contiguous
    expected = resize_image(to_gray_float(np.ascontiguousarray(frame)), PreprocessConfig(64, 64))
    assert np.abs(preprocess(frame, PreprocessConfig(64, 64)) - expected).max() < 1e-6


def test_the_engine_and_the_runtime_map_outputs_to_the_same_pixels():
    """certify's PixelMap (what a certificate bounds) and runtime's normalised_to_pixels
    (what the node publishes) are one definition: equal to the bit, at any image size."""
    import torch

    from usn_offline.certify.bounds import PixelMap

    rng = np.random.default_rng(0)
    for height, width in ((64, 64), (48, 80), (480, 640), (7, 3)):
        y = rng.uniform(-1.2, 1.2, (5, 4, 2))
        engine = PixelMap.for_image(4, height, width)(torch.from_numpy(y.reshape(5, 8))).numpy()
        runtime = normalised_to_pixels(y, height, width).reshape(5, 8)
        assert np.array_equal(engine, runtime)
    # The convention: -1 is the left/top edge of the first pixel, +1 the right/bottom edge of the last.
    assert np.allclose(normalised_to_pixels(np.array([[-1.0, -1.0], [1.0, 1.0]]), 48, 80),
                       [[-0.5, -0.5], [79.5, 47.5]])
