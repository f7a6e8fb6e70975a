"""The runtime photometric monitor: estimates, conservative decisions, saturation."""

import numpy as np
import pytest

from usn_offline.data import load_split
from usn_offline.perturb import PhotometricBox, apply_photometric
from usn_offline.runtime.monitor import (
    PhotometricMonitor,
    Reason,
    clipped_shares,
    mean_and_std,
    nominal_from_images,
    saturated_fraction,
)


@pytest.fixture(scope="module")
def images(tiny_dataset):
    return load_split(tiny_dataset, "train").images


def test_estimates_recover_a_known_change_within_their_uncertainty(images):
    monitor = PhotometricMonitor([PhotometricBox(0.5, 1.5, -0.5, 0.5)], nominal_from_images(images))
    rng = np.random.default_rng(0)
    covered = 0
    for img in images[:60]:
        a, b = rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
        est_a, est_b, sa, sb = monitor.estimate(apply_photometric(img, a, b, clip=False))
        covered += abs(est_a - a) <= 2 * sa and abs(est_b - b) <= 2 * sb
    assert covered >= 0.85 * 60


def test_scene_calibration_makes_the_estimate_precise(images):
    scene = images[5]
    frames = np.stack([np.clip(scene + np.random.default_rng(i).normal(0, 0.005, scene.shape), 0, 1)
                       for i in range(20)])
    monitor = PhotometricMonitor([PhotometricBox(0.9, 1.1, -0.05, 0.05)], nominal_from_images(frames))
    a, b, sa, sb = monitor.estimate(apply_photometric(scene, 1.05, 0.02, clip=False))
    assert a == pytest.approx(1.05, abs=0.02) and b == pytest.approx(0.02, abs=0.02)
    assert sa < 0.01 and sb < 0.01
    assert monitor.assess(apply_photometric(scene, 1.05, 0.02, clip=False)).certified
    out = monitor.assess(apply_photometric(scene, 1.3, 0.0, clip=False))
    assert not out.certified and out.reasons == [Reason.OUT_OF_REGION] and out.margin < 0


def test_decision_is_conservative(images):
    """With wide (dataset-level) uncertainty, nothing is certified inside a small region."""
    monitor = PhotometricMonitor([PhotometricBox(0.98, 1.02, -0.02, 0.02)], nominal_from_images(images))
    results = [monitor.assess(img) for img in images[:30]]
    assert not any(r.certified for r in results)
    assert all(Reason.OUT_OF_REGION in r.reasons for r in results)


def test_flat_and_saturated_frames():
    monitor = PhotometricMonitor([PhotometricBox(0.5, 1.5, -0.5, 0.5)],
                                 nominal_from_images(np.random.default_rng(0).random((10, 8, 8))))
    flat = monitor.assess(np.full((8, 8), 0.5))
    assert Reason.UNCERTAIN_ESTIMATE in flat.reasons
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:100] = 255
    frame[100:] = 128
    frac = saturated_fraction(frame, 255)
    assert frac == pytest.approx(100 / 480)
    result = monitor.assess(np.random.default_rng(1).random((8, 8)), frac)
    assert Reason.SATURATED in result.reasons and "clipped" in result.detail


def test_bad_configuration():
    stats = nominal_from_images(np.random.default_rng(0).random((4, 8, 8)))
    with pytest.raises(ValueError, match="empty"):
        PhotometricMonitor([], stats)


@pytest.mark.parametrize("shape,dtype,max_value", [
    ((48, 64, 3), np.uint8, 255), ((48, 64), np.uint8, 255),
    ((48, 64, 4), np.uint16, 65535), ((48, 64), np.float32, 1.0)])
def test_saturation_fast_path_matches_the_definition(shape, dtype, max_value):
    rng = np.random.default_rng(3)
    if dtype is np.float32:
        frame = rng.random(shape).astype(dtype)
    else:
        frame = rng.integers(0, int(max_value) + 1, size=shape).astype(dtype)
    frame[:5] = max_value
    frame[-3:] = 0
    colour = frame[:, :, :3] if frame.ndim == 3 else frame
    clipped = (colour <= 0) | (colour >= max_value)
    expected = (clipped.any(axis=2) if clipped.ndim == 3 else clipped).mean()
    assert saturated_fraction(frame, max_value) == pytest.approx(expected)
    black, blown = colour <= 0, colour >= max_value
    if black.ndim == 3:
        black, blown = black.any(axis=2), blown.any(axis=2)
    assert clipped_shares(frame, max_value) == pytest.approx((expected, black.mean(), blown.mean()))


@pytest.mark.parametrize("shape,dtype,max_value", [
    ((48, 64, 3), np.uint8, 255), ((48, 64), np.uint8, 255), ((48, 64), np.uint16, 65535)])
def test_saturation_of_frames_clipping_nowhere_or_in_one_value(shape, dtype, max_value):
    """The min/max shortcut for frames that clip nowhere, next to frames where a single
    channel value of a single pixel clips (which it must not miss)."""
    frame = np.random.default_rng(4).integers(1, int(max_value), size=shape).astype(dtype)
    assert saturated_fraction(frame, max_value) == 0.0
    pixels = shape[0] * shape[1]
    for value in (0, max_value):
        one = frame.copy()
        one.reshape(-1)[-1] = value
        assert saturated_fraction(one, max_value) == pytest.approx(1 / pixels)
        assert saturated_fraction(one[:, ::2], max_value) == 0.0  # a view without it (the last column)
        one_strided = one[:, 1::2]  # a non-contiguous view holding the clipped value
        assert saturated_fraction(one_strided, max_value) == pytest.approx(2 / pixels)


def test_an_opaque_alpha_channel_is_not_saturation():
    rgb = np.full((48, 64, 3), 120, np.uint8)
    rgba = np.dstack([rgb, np.full((48, 64), 255, np.uint8)])
    assert saturated_fraction(rgba, 255) == saturated_fraction(rgb, 255) == 0.0
    rgba[:12, :, 0] = 255  # a quarter of the pixels clipped in red
    assert saturated_fraction(rgba, 255) == pytest.approx(0.25)


def test_reason_values_are_the_message_constants():
    """runtime.monitor.Reason and CertificationStatus.msg's uint8 constants are one list."""
    import re
    from pathlib import Path

    from usn_offline.runtime.monitor import Reason

    text = (Path(__file__).resolve().parents[1] / "msg" / "CertificationStatus.msg").read_text()
    constants = {name: int(value) for name, value in re.findall(r"^uint8 ([A-Z_]+)=(\d+)", text, re.MULTILINE)}
    assert constants == {reason.name: reason.value for reason in Reason}


def test_mean_and_std_equal_numpy_in_float64():
    image = np.random.default_rng(3).random((64, 64), dtype=np.float32)
    mean, std = mean_and_std(image)
    exact = image.astype(np.float64)
    assert mean == pytest.approx(exact.mean(), abs=1e-12) and std == pytest.approx(exact.std(), abs=1e-12)
