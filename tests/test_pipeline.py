"""The shared frame pipeline: accuracy on clean frames at camera resolution, monitor
flags, and BAD_INPUT instead of exceptions."""

import cv2
import numpy as np
import pytest

from usn_offline.data.backgrounds import load_backgrounds
from usn_offline.data.render import RenderConfig, render_scene
from usn_offline.runtime.backends import OnnxRuntimeBackend
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.monitor import PhotometricMonitor, Reason, nominal_from_images
from usn_offline.runtime.pipeline import KeypointPipeline
from usn_offline.runtime.preprocess import preprocess


@pytest.fixture(scope="module")
def pipeline(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    monitor = PhotometricMonitor(bundle.region, bundle.nominal)
    return KeypointPipeline(bundle, OnnxRuntimeBackend(bundle.onnx_path), monitor)


def _camera_frame(seed):
    """A scene rendered at 64x64 and the same scene upscaled to a 640x480 RGB frame."""
    image, _ = render_scene(np.random.default_rng(seed), load_backgrounds(), RenderConfig())
    frame = cv2.resize(image, (640, 480), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB), image


def test_keypoints_come_back_in_frame_pixels(pipeline):
    frame, small = _camera_frame(1)
    result = pipeline.process(frame)
    assert result.keypoints_px.shape == (4, 2)
    assert set(result.seconds) == {"preprocess", "inference", "monitor", "total"}
    # The 64x64 scene itself gives the same keypoints, in its own (10x / 7.5x smaller) pixels,
    # up to the interpolation difference of upscaling and downscaling again (< 1 input pixel).
    at_net_size = pipeline.process(small).keypoints_px
    expected = (at_net_size + 0.5) * np.array([640 / 64, 480 / 64]) - 0.5
    np.testing.assert_allclose(result.keypoints_px, expected, atol=10.0)
    # The same frame as mono8 and as 16-bit gives the same keypoints.
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    np.testing.assert_allclose(pipeline.process(gray).keypoints_px, result.keypoints_px, atol=0.05)
    np.testing.assert_allclose(pipeline.process(gray.astype(np.uint16) * 257).keypoints_px,
                               result.keypoints_px, atol=0.05)


@pytest.mark.parametrize("frame,fragment", [
    (np.zeros((0, 640, 3), np.uint8), "empty frame"),
    (np.zeros((480, 640, 2), np.uint8), "unsupported frame shape"),
    (np.full((48, 64), np.nan, np.float32), "NaN"),
    (np.zeros((5000, 5000), np.uint8), "exceeds the limit"),
    (np.zeros((48, 64), np.int64), "unsupported pixel type"),
    ([[1, 2], [3, 4]], "not an array"),
])
def test_bad_frames_give_bad_input(pipeline, frame, fragment):
    result = pipeline.process(frame)
    assert result.keypoints_px is None and not result.certified
    assert result.status.reasons == [Reason.BAD_INPUT] and fragment in result.status.detail


def test_strong_lighting_change_is_flagged(pipeline):
    frame, _ = _camera_frame(2)
    # Calibrated on this scene under nominal light, the monitor certifies the clean frame...
    rng = np.random.default_rng(0)
    clean = [preprocess(np.clip(frame + rng.normal(0, 1.0, frame.shape), 0, 255).astype(np.uint8),
                        pipeline.bundle.preprocess) for _ in range(10)]
    monitor = PhotometricMonitor(pipeline.bundle.region, nominal_from_images(np.stack(clean)))
    calibrated = KeypointPipeline(pipeline.bundle, pipeline.backend, monitor)
    assert calibrated.process(frame).certified
    # ... and flags the same scene at 30 % contrast.
    dark = (frame.astype(np.float32) * 0.3).astype(np.uint8)
    result = calibrated.process(dark)
    assert not result.certified and Reason.OUT_OF_REGION in result.status.reasons
    assert result.status.contrast == pytest.approx(0.3, abs=0.05)
    blown = np.clip(frame.astype(np.int32) * 3, 0, 255).astype(np.uint8)
    assert Reason.SATURATED in pipeline.process(blown).status.reasons


def test_certificate_mismatch_flags_every_frame(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    pipe = KeypointPipeline(bundle, OnnxRuntimeBackend(bundle.onnx_path),
                            PhotometricMonitor(bundle.region, bundle.nominal), certificate_matches=False)
    frame, _ = _camera_frame(3)
    result = pipe.process(frame)
    assert Reason.CERTIFICATE_MISMATCH in result.status.reasons and result.keypoints_px is not None
