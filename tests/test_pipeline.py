"""The shared frame pipeline: accuracy on clean frames at camera resolution, monitor
flags, and BAD_INPUT instead of exceptions."""

import cv2
import numpy as np
import pytest

from usn_offline.data.backgrounds import load_backgrounds
from usn_offline.data.render import RenderConfig, render_scene
from usn_offline.perturb import PhotometricBox
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
    assert set(result.seconds) == {"preprocess", "inference", "monitor", "proof", "total"}
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


# The lighting range of the per-frame proofs (narrower than the test bundle's region,
# which this little model proves offline only at delta = 50 px on a few test images).
LIGHTING = PhotometricBox(0.97, 1.03, -0.03, 0.03)


@pytest.fixture(scope="module")
def certifier(exported_bundle):
    from usn_offline.certify.frame import FrameCertifier

    return FrameCertifier.for_bundle(Bundle.load(exported_bundle), max_boxes=8, lighting=LIGHTING)


def test_only_a_proof_certifies(pipeline, certifier):
    frame, _ = _camera_frame(4)
    # Without a verifier nothing is certified, whatever the estimate says.
    result = pipeline.process(frame)
    assert not result.certified and result.status.reasons == [Reason.NOT_CHECKED]
    assert "no per-frame verifier" in result.status.detail and np.isfinite(result.status.contrast)
    proving = KeypointPipeline(pipeline.bundle, pipeline.backend, pipeline.monitor, verifier=certifier)
    result = proving.process(frame)
    assert result.certified, result.status.detail
    assert 0 <= result.status.proven_deviation_px <= pipeline.bundle.delta_px
    # The same scene darkened and brightened inside the lighting range:
    for a, b in ((LIGHTING.a_lo, LIGHTING.b_lo), (LIGHTING.a_hi, LIGHTING.b_hi)):
        relit = np.clip(np.rint(a * frame.astype(np.float64) + 255 * b), 0, 255).astype(np.uint8)
        assert proving.process(relit).certified
    # A frame with nothing to see (all black): its nominal image could be anything up to
    # the range's brightness, and the proof fails: not certified.
    black = proving.process(np.zeros_like(frame))
    assert not black.certified and black.status.reasons == [Reason.NOT_PROVED] and black.keypoints_px is not None


def test_proving_every_nth_frame_and_verifier_errors(pipeline, certifier):
    frame, _ = _camera_frame(5)
    sparse = KeypointPipeline(pipeline.bundle, pipeline.backend, pipeline.monitor, verifier=certifier, prove_every=3)
    decided = [sparse.process(frame) for _ in range(6)]
    assert [r.certified for r in decided] == [True, False, False, True, False, False]
    assert decided[1].status.reasons == [Reason.NOT_CHECKED] and "every 3th frame" in decided[1].status.detail

    # Deferred decisions (the node's prover thread) and a busy prover:
    deferred = KeypointPipeline(pipeline.bundle, pipeline.backend, pipeline.monitor, verifier=certifier)
    later = deferred.process(frame, prove="later")
    assert later.pending is not None and not later.certified and later.keypoints_px is not None
    busy = deferred.process(frame, prove="busy")
    assert not busy.certified and busy.status.reasons == [Reason.NOT_CHECKED] and "busy" in busy.status.detail
    assert deferred.finish(later).certified and later.pending is None
    with pytest.raises(ValueError, match="not pending"):
        deferred.finish(later)
    with pytest.raises(ValueError, match="prove must be"):
        deferred.process(frame, prove="sometimes")

    class Broken:
        def prove(self, frame, keypoints):
            raise RuntimeError("out of memory")

    broken = KeypointPipeline(pipeline.bundle, pipeline.backend, pipeline.monitor, verifier=Broken())
    result = broken.process(frame)
    assert not result.certified and result.status.reasons == [Reason.NOT_PROVED]
    assert "verifier error: RuntimeError: out of memory" in result.status.detail and result.keypoints_px is not None
    with pytest.raises(ValueError, match="prove_every"):
        KeypointPipeline(pipeline.bundle, pipeline.backend, pipeline.monitor, prove_every=0)


def test_monitor_veto_withholds_certification(pipeline, certifier):
    frame, _ = _camera_frame(2)
    # Calibrated on this scene under nominal light, the monitor passes the clean frame...
    rng = np.random.default_rng(0)
    clean = [preprocess(np.clip(frame + rng.normal(0, 1.0, frame.shape), 0, 255).astype(np.uint8),
                        pipeline.bundle.preprocess) for _ in range(10)]
    monitor = PhotometricMonitor(pipeline.bundle.region, nominal_from_images(np.stack(clean)))
    vetoing = KeypointPipeline(pipeline.bundle, pipeline.backend, monitor, verifier=certifier, monitor_veto=True)
    assert vetoing.process(frame).certified
    # ... and flags the same scene at 30 % contrast (a diagnostic only without the veto).
    dark = (frame.astype(np.float32) * 0.3).astype(np.uint8)
    result = vetoing.process(dark)
    assert not result.certified and Reason.OUT_OF_REGION in result.status.reasons
    assert result.status.contrast == pytest.approx(0.3, abs=0.05)
    diagnostic = KeypointPipeline(pipeline.bundle, pipeline.backend, monitor, verifier=certifier).process(dark)
    assert Reason.OUT_OF_REGION not in diagnostic.status.reasons and "monitor (diagnostic)" in diagnostic.status.detail
    blown = np.clip(frame.astype(np.int32) * 3, 0, 255).astype(np.uint8)
    assert Reason.SATURATED in vetoing.process(blown).status.reasons


def test_certificate_mismatch_flags_every_frame(exported_bundle):
    bundle = Bundle.load(exported_bundle)
    pipe = KeypointPipeline(bundle, OnnxRuntimeBackend(bundle.onnx_path),
                            PhotometricMonitor(bundle.region, bundle.nominal), certificate_matches=False)
    frame, _ = _camera_frame(3)
    result = pipe.process(frame)
    assert Reason.CERTIFICATE_MISMATCH in result.status.reasons and result.keypoints_px is not None


def test_scene_check_flags_a_darkened_frame_without_a_proof(pipeline, certifier):
    """A tunnel (30 % contrast): the proof for the range might well succeed on the dark
    frame itself; the scene check says no lighting of the range gives it from a scene of
    the training images' contrast, at once and without proving."""
    from usn_offline.runtime.scene_check import make_scene_check

    bundle = pipeline.bundle
    calls = []

    class Counting:
        def prove(self, frame, keypoints):
            calls.append(frame)
            return certifier.prove(frame, keypoints)

    scene = make_scene_check(bundle, True, bundle.lighting_range((LIGHTING.a_lo, LIGHTING.a_hi, LIGHTING.b_lo,
                                                                   LIGHTING.b_hi)))
    checked = KeypointPipeline(bundle, pipeline.backend, pipeline.monitor, verifier=Counting(), scene_check=scene)
    frame, _ = _camera_frame(4)
    std = float(preprocess(frame, bundle.preprocess).std())
    assert scene.min_std <= std <= scene.max_std  # a scene like the training ones
    assert checked.process(frame).certified and len(calls) == 1
    dark = (frame.astype(np.float32) * 0.3).astype(np.uint8)
    for prove in ("now", "later", "busy"):
        result = checked.process(dark, prove=prove)
        assert result.pending is None and not result.certified and result.status.reasons == [Reason.OUT_OF_REGION]
        assert "frame contrast too low for the lighting range" in result.status.detail
    assert len(calls) == 1  # no proof was spent on the dark frames
