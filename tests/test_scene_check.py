"""The scene contrast check: sound (never flags a frame that a lighting change of the
range made from a scene of the assumed contrast, clipping and camera rounding included),
and it catches the darkening and glare the per-frame proof cannot see."""

import json
import shutil

import cv2
import numpy as np
import pytest

from usn_offline.errors import ConfigError
from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.monitor import clipped_shares, saturated_fraction
from usn_offline.runtime.preprocess import PreprocessConfig, full_scale, preprocess
from usn_offline.runtime.scene_check import SceneContrastCheck, make_scene_check

RANGE = PhotometricBox(0.9, 1.1, -0.1, 0.1)
CONFIG = PreprocessConfig(64, 64)


def _scene(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A nominal view in [0, 1]: smooth structure, flat regions at 0 and 1 (clipping
    candidates) and noise, at a random contrast."""
    h, w = shape[:2]
    coarse = rng.uniform(0, 1, (6, 8) + shape[2:]).astype(np.float32)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(shape)
    spread = rng.uniform(0.05, 1.5)
    view = 0.5 + spread * (smooth - 0.5) + rng.normal(0, 0.02, shape)
    return np.clip(view, 0, 1)


def _relight(view: np.ndarray, a: float, b: float, dtype) -> np.ndarray:
    if dtype == np.float32:
        return np.clip(a * view + b, 0, 1).astype(np.float32)
    top = 255 if dtype == np.uint8 else 65535
    return np.clip(np.rint(top * (a * view + b)), 0, top).astype(dtype)


def _nominal_std(view: np.ndarray, dtype) -> float:
    return float(preprocess(_relight(view, 1.0, 0.0, dtype), CONFIG).std())


@pytest.mark.parametrize("shape,dtype", [((480, 640), np.uint8), ((720, 1280, 3), np.uint8),
                                         ((48, 40), np.uint16), ((120, 160, 4), np.uint8),
                                         ((64, 64), np.float32)])
def test_never_flags_a_frame_the_range_explains(shape, dtype):
    """Sampled scenes and lighting changes inside the range, the range's corners included
    (most clipping), against a scene std interval that is exactly the scene's own std:
    the tightest assumption the scene satisfies."""
    rng = np.random.default_rng(7)
    clipped_frames = 0
    corners = [(RANGE.a_lo, RANGE.b_lo), (RANGE.a_hi, RANGE.b_hi), (RANGE.a_lo, RANGE.b_hi), (RANGE.a_hi, RANGE.b_lo)]
    for trial in range(12):
        view = _scene(rng, shape)
        if len(shape) == 3 and shape[2] == 4:
            view[:, :, 3] = 1.0  # opaque alpha
        nominal = preprocess(_relight(view, 1.0, 0.0, dtype), CONFIG)
        # The scene is the nominal *view* X0 (the camera's rounding of it is part of the frame).
        s0 = float(preprocess(view.astype(np.float32), CONFIG).std())
        check = SceneContrastCheck(RANGE, s0, s0, CONFIG)
        for a, b in corners + [tuple(rng.uniform([RANGE.a_lo, RANGE.b_lo], [RANGE.a_hi, RANGE.b_hi]))
                               for _ in range(4)]:
            frame = _relight(view, a, b, dtype)
            image = preprocess(frame, CONFIG)
            assert check.check(frame, image) is None, (trial, a, b)
            # The core inequality, directly: |std(frame) - a s0| <= the error bound.
            assert abs(float(image.std()) - a * s0) <= check.error_bound(frame)
            # The pipeline passes the monitor's clipped fraction: the same bound, clipped or not.
            fraction = saturated_fraction(frame, full_scale(frame.dtype))
            assert check.error_bound(frame, fraction) == check.error_bound(frame)
            clipped_frames += fraction > 0
        assert abs(float(nominal.std()) - s0) <= check.error_bound(_relight(view, 1.0, 0.0, dtype))
    assert clipped_frames > 0  # the corners clip: the masks are exercised


def test_the_bound_is_tight_enough_to_catch_a_tunnel_and_glare():
    rng = np.random.default_rng(3)
    view = 0.5 + 0.4 * (_scene(rng, (480, 640)) - 0.5)  # little clipping even at contrast 2
    s0 = _nominal_std(view, np.uint8)
    check = SceneContrastCheck(PhotometricBox(0.97, 1.03, -0.03, 0.03), 0.8 * s0, 1.25 * s0, CONFIG)
    for a, b, verdict in ((1.0, 0.0, None), (0.35, -0.03, "too low"), (0.6, 0.1, "too low"),
                          (1.6, -0.3, "too high"), (2.0, -0.5, "too high"), (0.0, 0.0, "too low")):
        frame = _relight(view, a, b, np.uint8)
        found = check.check(frame, preprocess(frame, CONFIG))
        assert (found is None) if verdict is None else (verdict in found), (a, b, found)
    # Clipping widens the bound: every pixel of a black frame could hide any value down to
    # the range's lowest brightness (0.03 below zero), whose std is at most 0.015; and
    # that is still too flat.
    black = np.zeros((480, 640), np.uint8)
    assert check.error_bound(black) == pytest.approx(0.015 + 0.5 / 255, abs=1e-4)
    assert "too low" in check.check(black, preprocess(black, CONFIG))


def test_make_scene_check_from_the_bundle_and_parameters(exported_bundle, tmp_path):
    bundle = Bundle.load(exported_bundle)
    nominal = bundle.nominal
    assert 0 < nominal.low_std <= nominal.mean_of_stds <= nominal.high_std
    box = bundle.lighting_range()
    check = make_scene_check(bundle, True, box)
    assert (check.min_std, check.max_std, check.lighting) == (nominal.low_std, nominal.high_std, bundle.region[0])
    assert make_scene_check(bundle, False, box) is None
    assert make_scene_check(bundle, True, box, (0.05, 0.4)).min_std == 0.05
    with pytest.raises(ConfigError, match="scene_std_range needs 2 numbers"):
        make_scene_check(bundle, True, box, (0.05,))
    with pytest.raises(ConfigError, match="0 <= min <= max"):
        make_scene_check(bundle, True, box, (0.4, 0.05))
    # A bundle exported before the statistics existed: a clear error, unless a range is given.
    old = tmp_path / "old"
    shutil.copytree(exported_bundle, old)
    cert = json.loads((old / "certificate.json").read_text())
    del cert["nominal_statistics"]["low_std"], cert["nominal_statistics"]["high_std"]
    _rewrite(old, cert)
    old_bundle = Bundle.load(old)
    with pytest.raises(ConfigError, match="re-export it, set scene_std_range"):
        make_scene_check(old_bundle, True, box)
    assert make_scene_check(old_bundle, True, box, (0.05, 0.4)) is not None
    cert["nominal_statistics"]["low_std"] = 0.1
    _rewrite(old, cert)
    with pytest.raises(Exception, match="low_std and high_std come together"):
        Bundle.load(old)


def _rewrite(root, certificate) -> None:
    """Write a certificate and re-hash it in the manifest (as a re-export would)."""
    from usn_offline.runtime.hashing import sha256_file

    (root / "certificate.json").write_text(json.dumps(certificate))
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["files"]["certificate.json"]
    entry["sha256"], entry["bytes"] = sha256_file(root / "certificate.json"), (root / "certificate.json").stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_lighting_range_parameter(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    assert bundle.lighting_range((0.0,) * 4) == bundle.region[0]
    assert bundle.lighting_range((0.5, 2.0, -0.1, 0.1)) == PhotometricBox(0.5, 2.0, -0.1, 0.1)
    for bad in ((0.5, 2.0), (0.0, 2.0, -0.1, 0.1), (1.2, 1.1, 0.0, 0.0), (0.9, float("inf"), 0.0, 0.0)):
        with pytest.raises(Exception, match="lighting range"):
            bundle.lighting_range(bad)


@pytest.mark.parametrize("shape,dtype", [((480, 640, 3), np.uint8), ((720, 1280, 4), np.uint8),
                                         ((480, 640), np.uint16), ((100, 90), np.uint8), ((48, 40), np.uint8)])
def test_clipped_pixel_weights_by_counting_equal_the_resized_masks(shape, dtype):
    """A frame that the preprocessing area-averages weighs each pixel the same in the
    input's mean, so the clipped masks' weights are their shares of the pixels (counted,
    not resized): equal to the resized masks' up to float32 resize rounding, never below
    the exact share. A frame smaller than the input (bilinear upscale) keeps the resize."""
    from usn_offline.runtime.scene_check import _clipped_masks

    check = SceneContrastCheck(RANGE, 0.05, 0.3, CONFIG)
    rng = np.random.default_rng(11)
    top = int(full_scale(np.dtype(dtype)))
    for _ in range(4):
        frame = _relight(_scene(rng, shape), rng.uniform(0.8, 1.3), rng.uniform(-0.2, 0.2), dtype)
        h, w = shape[:2]
        frame[rng.integers(0, h, h * w // 20), rng.integers(0, w, h * w // 20)] = 0  # some pixels black
        blown = (rng.integers(0, h, h * w // 10), rng.integers(0, w, h * w // 10))
        if frame.ndim == 3:
            frame[blown + (0,)] = top  # one channel blown
        else:
            frame[blown] = top
        pixels = frame[:, :, :3] if frame.ndim == 3 and frame.shape[2] == 4 else frame
        low, high = _clipped_masks(pixels, top)
        assert low.any() and high.any()
        counted = check._clip_weights(pixels, top)
        # The node counts the shares once, before inference (monitor.clipped_shares): the
        # same weights, and the same bound.
        _, black, blown_share = clipped_shares(frame, top)
        assert check._clip_weights(pixels, top, (black, blown_share)) == counted
        assert check.error_bound(frame, None, (black, blown_share)) == check.error_bound(frame)
        resized = (check._mean_weight(low), check._mean_weight(high))
        for mine, theirs, mask in zip(counted, resized, (low, high), strict=True):
            if shape[0] < CONFIG.input_height:
                assert mine == theirs  # the resize path itself
            else:
                assert mine >= float(mask.mean()) and abs(mine - theirs) <= 1e-6
