"""The node's per-frame behaviour outside ROS (runtime.stream): decoding errors, start-up
calibration that skips flat frames, and the parameters file the node and replay share."""

from pathlib import Path

import numpy as np
import pytest

from usn_offline.errors import ConfigError
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.monitor import Reason
from usn_offline.runtime.stream import StreamSettings

PARAMS = Path(__file__).resolve().parents[1] / "launch" / "usn_keypoint_node.params.yaml"


def _scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.kron(rng.uniform(0.2, 0.8, (6, 8)), np.ones((80, 80)))
    return np.clip(255 * base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)


def test_shipped_parameters_file_is_read():
    settings = StreamSettings.from_params_file(PARAMS)
    assert settings.backend == "auto" and settings.monitor_z == 2.0 and settings.max_image_pixels == 16777216
    assert settings.frame_proof and not settings.monitor_veto and settings.frame_proof_lighting == (0.0,) * 4


@pytest.mark.parametrize("text, message", [
    ("other_node:\n  ros__parameters: {}\n", "no 'usn_keypoint_node: ros__parameters:' section"),
    ("usn_keypoint_node:\n  ros__parameters:\n    monitor_calibration_frames: 2.5\n",
     "monitor_calibration_frames must be a int, got 2.5"),
    ("usn_keypoint_node:\n  ros__parameters:\n    monitor_z: true\n", "monitor_z must be a float"),
    ("usn_keypoint_node: [unclosed\n", "not valid YAML"),
    ("usn_keypoint_node:\n  ros__parameters:\n    frame_proof_lighting: [0.9, 1.1]\n",
     "frame_proof_lighting must be a list of 4 numbers"),
    # the node's ranges and choices apply to a replay's parameter file too
    ("usn_keypoint_node:\n  ros__parameters:\n    frame_proof_every: 0\n",
     r"frame_proof_every=0 must be in \[1, 1000\]"),
    ("usn_keypoint_node:\n  ros__parameters:\n    max_image_pixels: -5\n", "max_image_pixels=-5 must be in"),
    ("usn_keypoint_node:\n  ros__parameters:\n    frame_proof_max_boxes: 0\n", "frame_proof_max_boxes=0 must be in"),
    ("usn_keypoint_node:\n  ros__parameters:\n    monitor_z: -1.0\n", "monitor_z=-1.0 must be in"),
    ("usn_keypoint_node:\n  ros__parameters:\n    monitor_max_saturated_fraction: 2\n",
     "monitor_max_saturated_fraction=2 must be in"),
    ("usn_keypoint_node:\n  ros__parameters:\n    monitor_calibration_frames: -3\n",
     "monitor_calibration_frames=-3 must be in"),
    ("usn_keypoint_node:\n  ros__parameters:\n    backend: tensorflow\n", "backend='tensorflow' must be one of"),
    ("usn_keypoint_node:\n  ros__parameters:\n    input_qos: BEST\n", "input_qos='BEST' must be one of"),
    ("usn_keypoint_node:\n  ros__parameters:\n    input_qos_depth: five\n", "input_qos_depth must be a number"),
    ("usn_keypoint_node:\n  ros__parameters:\n    trusted_key: [k.pub]\n",
     r"unknown parameter trusted_key \(did you mean trusted_keys\?\)"),
])
def test_bad_parameters_files(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        StreamSettings.from_params_file(path)
    with pytest.raises(ConfigError, match="parameters file not found"):
        StreamSettings.from_params_file(tmp_path / "missing.yaml")


def test_calibration_skips_black_frames(exported_bundle):
    """A lens cap at start: black frames neither calibrate the monitor nor break it."""
    bundle = Bundle.load(exported_bundle)
    stream = StreamSettings(monitor_calibration_frames=3, monitor_veto=True).open(bundle)  # no verifier
    black = np.zeros((480, 640), np.uint8)
    for _ in range(4):
        result = stream.process_raw(480, 640, "mono8", False, 640, black.tobytes())
        # every pixel at 0: far too flat for the lighting range (the scene check), so no
        # proof is needed to withhold it
        assert result.status.reasons == [Reason.UNCERTAIN_ESTIMATE, Reason.SATURATED, Reason.OUT_OF_REGION]
        assert "3 left" in result.status.detail
    assert stream.calibrating
    for i in range(3):
        result = stream.process_frame(_scene(i))
        assert result.status.reasons == [Reason.UNCERTAIN_ESTIMATE, Reason.NOT_CHECKED]
    assert not stream.calibrating and "calibrated on 3 frames" in result.status.detail
    nominal = stream.pipeline.monitor.nominal
    assert nominal.num_images == 3 and nominal.mean_of_stds > 0.1
    after = stream.process_frame(_scene(7))
    assert Reason.UNCERTAIN_ESTIMATE not in after.status.reasons and np.isfinite(after.status.contrast)
    dark = stream.process_raw(480, 640, "mono8", False, 640, black.tobytes())
    assert dark.status.reasons == [Reason.UNCERTAIN_ESTIMATE, Reason.SATURATED, Reason.OUT_OF_REGION]
    assert dark.keypoints_px is not None


def test_bad_frames_never_raise(exported_bundle):
    stream = StreamSettings().open(Bundle.load(exported_bundle))
    cases = [stream.process_raw(480, 640, "bayer_rggb8", False, 640, bytes(640 * 480)),
             stream.process_raw(480, 640, "rgb8", False, 1920, b"\x00" * 10),
             stream.process_compressed("jpeg", b"nope"),
             stream.process_frame(np.full((4, 4, 2), 3, np.uint8))]
    for result in cases:
        assert result.status.reasons == [Reason.BAD_INPUT] and result.keypoints_px is None
        assert result.status.detail and result.seconds["total"] >= 0
