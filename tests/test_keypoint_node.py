"""The keypoint node over real DDS: a separate node process, images in, keypoints, one
certification status per frame (proved per frame for frames inside the stated lighting
range, withheld outside it), BAD_INPUT for malformed frames, monitor flags and
diagnostics out. Parameters come from the real params YAML via --ros-args."""

import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import log_until, spin_until, stop  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from usn_keypoint_msgs.msg import CertificationStatus, KeypointArray  # noqa: E402

from usn_offline.data.backgrounds import load_backgrounds  # noqa: E402
from usn_offline.data.render import RenderConfig, render_scene  # noqa: E402
from usn_offline.runtime.backends import OnnxRuntimeBackend  # noqa: E402
from usn_offline.runtime.bundle import Bundle  # noqa: E402
from usn_offline.runtime.monitor import PhotometricMonitor  # noqa: E402
from usn_offline.runtime.pipeline import KeypointPipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The lighting range the node proves frames for (narrower than the test bundle's region,
# which its little model proves only at delta = 50 px).
LIGHTING = (0.97, 1.03, -0.03, 0.03)
PARAMS = REPO / "launch" / "usn_keypoint_node.params.yaml"
LAUNCH = REPO / "launch" / "usn_keypoint_node.launch.py"


def _wait_for_node(node, pub, proc) -> None:
    """Until the node under test subscribes to our images and publishes statuses."""
    spin_until(node, lambda: pub.get_subscription_count() > 0
               and node.count_publishers("/usn_keypoint_node/status") > 0, 60, proc)
    time.sleep(0.5)


def _image_msg(frame: np.ndarray, encoding: str, index: int) -> Image:
    msg = Image(height=frame.shape[0], width=frame.shape[1], encoding=encoding, is_bigendian=0,
                step=frame.strides[0], data=frame.tobytes())
    msg.header.stamp.sec, msg.header.frame_id = index, "camera_optical"
    return msg


def _scene() -> np.ndarray:
    image, _ = render_scene(np.random.default_rng(19), load_backgrounds(), RenderConfig())
    return cv2.cvtColor(cv2.resize(image, (640, 480), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB)


def _frames():
    """(message, kind) in publishing order: 3 calibration frames, clean, changed, malformed."""
    scene = _scene()
    rng = np.random.default_rng(0)
    noisy = [np.clip(scene + rng.normal(0, 1.0, scene.shape), 0, 255).astype(np.uint8) for _ in range(6)]
    out = [(f, "rgb8", "calibration") for f in noisy[:3]]
    out += [(noisy[3], "rgb8", "clean"), (noisy[4][:, :, ::-1].copy(), "bgr8", "clean"),
            (cv2.cvtColor(noisy[5], cv2.COLOR_RGB2GRAY), "mono8", "clean")]
    # Inside the stated lighting range (LIGHTING): the corners of the range.
    out += [(np.clip(np.rint(a * noisy[i].astype(np.float64) + 255 * b), 0, 255).astype(np.uint8), "rgb8", "inside")
            for i, (a, b) in ((0, (LIGHTING[0], LIGHTING[2])), (1, (LIGHTING[1], LIGHTING[3])))]
    # Outside it:
    out += [((scene * 0.3).astype(np.uint8), "rgb8", "dark"),
            (np.clip(scene.astype(np.int32) * 4 + 80, 0, 255).astype(np.uint8), "rgb8", "blown")]
    msgs = [(_image_msg(f, enc, i), kind) for i, (f, enc, kind) in enumerate(out)]
    n = len(msgs)
    bad = _image_msg(scene, "rgb8", n)
    bad.encoding = "bayer_rggb8"
    short = _image_msg(scene, "rgb8", n + 1)
    short.data = bytes(short.data)[:1000]
    empty = Image(height=0, width=0, encoding="mono8", step=0)
    empty.header.stamp.sec = n + 2
    nan = _image_msg(np.full((48, 64), np.nan, np.float32), "32FC1", n + 3)
    msgs += [(bad, "malformed"), (short, "malformed"), (empty, "malformed"), (nan, "malformed")]
    # Distinct scenes with known keypoints, for accuracy.
    truths = {}
    for seed in range(100, 108):
        image, kps = render_scene(np.random.default_rng(seed), load_backgrounds(), RenderConfig())
        frame = cv2.cvtColor(cv2.resize(image, (640, 480), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB)
        truths[len(msgs)] = kps
        msgs.append((_image_msg(frame, "rgb8", len(msgs)), "scene"))
    return msgs, scene, truths


@pytest.fixture(scope="module")
def node_run(exported_bundle):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "--params-file", str(PARAMS),
           "-p", f"bundle_dir:={exported_bundle}", "-p", "input_qos:=DEFAULT", "-p", "input_qos_depth:=50",
           "-p", "monitor_calibration_frames:=3", "-p", "diagnostics_period:=0.2",
           "-p", "monitor_max_saturated_fraction:=0.1", "-p", "monitor_veto:=true",
           "-p", f"frame_proof_lighting:={list(LIGHTING)}",
           "-r", "image:=/usn_test/camera/image"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    msgs, scene, truths = _frames()
    statuses, keypoints, diagnostics = [], [], []
    rclpy.init()
    try:
        node = Node("usn_test_camera")
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        pub = node.create_publisher(Image, "/usn_test/camera/image", qos)
        node.create_subscription(CertificationStatus, "/usn_keypoint_node/status", statuses.append, qos)
        node.create_subscription(KeypointArray, "/usn_keypoint_node/keypoints", keypoints.append, qos)
        node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, qos)
        _wait_for_node(node, pub, proc)
        for i, (msg, _) in enumerate(msgs):
            # Lock-step (each frame once the previous one is decided), as a replay does: a
            # frame arriving while the node is proving another would get NOT_CHECKED.
            pub.publish(msg)
            spin_until(node, lambda n=i + 1: len(statuses) >= n, 60, proc)  # a dead node fails fast
        spin_until(node, lambda: len(statuses) >= len(msgs) and bool(diagnostics), 120, proc)
        end = time.monotonic() + 0.5  # anything extra would show up here
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.05)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        err = stop(proc)
    return {"msgs": msgs, "scene": scene, "truths": truths, "statuses": statuses, "keypoints": keypoints,
            "diagnostics": diagnostics, "stderr": err, "bundle": exported_bundle}


def test_every_frame_gets_exactly_one_status(node_run):
    msgs, statuses = node_run["msgs"], node_run["statuses"]
    assert len(statuses) == len(msgs), node_run["stderr"][-3000:]
    assert sorted(s.header.stamp.sec for s in statuses) == list(range(len(msgs)))
    sent = {m.header.stamp.sec: m.header.frame_id for m, _ in msgs}
    assert all(s.header.frame_id == sent[s.header.stamp.sec] for s in statuses)


def test_malformed_frames_are_bad_input_and_get_no_keypoints(node_run):
    by_stamp = {s.header.stamp.sec: s for s in node_run["statuses"]}
    kinds = [kind for _, kind in node_run["msgs"]]
    for i, kind in enumerate(kinds):
        bad = CertificationStatus.BAD_INPUT in by_stamp[i].reasons
        assert bad == (kind == "malformed"), (i, kind, by_stamp[i].detail)
    details = " | ".join(by_stamp[i].detail for i, k in enumerate(kinds) if k == "malformed")
    for fragment in ("unsupported encoding 'bayer_rggb8'", "data has 1000 bytes", "empty image", "NaN"):
        assert fragment in details
    assert len(node_run["keypoints"]) == len(kinds) - kinds.count("malformed")
    assert "BAD_INPUT" in node_run["stderr"]  # the throttled log line


def test_keypoints_match_the_shared_pipeline(node_run):
    bundle = Bundle.load(node_run["bundle"])
    pipe = KeypointPipeline(bundle, OnnxRuntimeBackend(bundle.onnx_path), PhotometricMonitor(bundle.region,
                                                                                              bundle.nominal))
    by_stamp = {k.header.stamp.sec: k for k in node_run["keypoints"]}
    for i, (msg, kind) in enumerate(node_run["msgs"]):
        if kind == "malformed":
            assert i not in by_stamp
            continue
        frame = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, -1).squeeze()
        if msg.encoding == "bgr8":
            frame = frame[:, :, ::-1]
        expected = pipe.process(frame).keypoints_px
        got = np.array([[k.x, k.y] for k in by_stamp[i].keypoints])
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert by_stamp[i].model_sha256 == bundle.model_sha256 and by_stamp[i].header.frame_id == "camera_optical"


def test_keypoints_are_accurate_on_clean_frames(node_run):
    """Keypoints of distinct clean scenes, mapped back to 640x480, land near the truth
    (errors in pixels of the 64x64 scene the frame was upscaled from)."""
    by_stamp = {k.header.stamp.sec: k for k in node_run["keypoints"]}
    errors = []
    for i, truth in node_run["truths"].items():
        got = np.array([[k.x, k.y] for k in by_stamp[i].keypoints])
        got_small = (got + 0.5) / np.array([640 / 64, 480 / 64]) - 0.5
        errors.append(np.linalg.norm(got_small - truth, axis=1))
    errors = np.concatenate(errors)
    assert errors.mean() < 6.0, errors  # the fixture model's own test error is ~3 px
    assert np.median(errors) < 5.0


def test_decisions_inside_and_outside_the_lighting_range(node_run):
    bundle = Bundle.load(node_run["bundle"])
    by_stamp = {s.header.stamp.sec: s for s in node_run["statuses"]}
    certified = 0
    for i, (msg, kind) in enumerate(node_run["msgs"]):
        s = by_stamp[i]
        assert list(s.lighting_range) == pytest.approx(list(LIGHTING))
        if kind != "malformed":  # the bound in this frame's pixels, per axis
            assert s.delta_x_px == pytest.approx(bundle.effective_delta_px * msg.width / 64, rel=1e-6)
            assert s.delta_y_px == pytest.approx(bundle.effective_delta_px * msg.height / 64, rel=1e-6)
        if s.certified:
            certified += 1
            assert not s.reasons and 0 <= s.proven_x_px <= s.delta_x_px and 0 <= s.proven_y_px <= s.delta_y_px
        else:
            assert s.reasons and np.isnan(s.proven_x_px)
        if kind == "calibration":  # proved, but the veto waits for the monitor's calibration
            assert not s.certified and CertificationStatus.UNCERTAIN_ESTIMATE in s.reasons
        elif kind in ("clean", "inside"):
            assert s.certified, s.detail
            assert s.margin >= 0
        elif kind == "dark":
            assert not s.certified and CertificationStatus.OUT_OF_REGION in s.reasons
            assert s.contrast == pytest.approx(0.3, abs=0.05)
        elif kind == "blown":
            assert CertificationStatus.SATURATED in s.reasons
        assert len(s.certificate_id) == 64
    assert certified >= 5


def test_diagnostics(node_run):
    ours = [st for arr in node_run["diagnostics"] for st in arr.status if st.name.startswith("usn_keypoint_node")]
    assert ours
    last = {kv.key: kv.value for kv in ours[-1].values}
    assert int(last["frames"]) == len(node_run["msgs"])
    assert int(last["bad_input_frames"]) == 4
    assert last["backend"] == "onnxruntime" and float(last["mean_latency_ms"]) > 0
    flagged = sum(not s.certified for s in node_run["statuses"]) / len(node_run["msgs"])
    assert float(last["flagged_fraction"]) == pytest.approx(flagged, abs=1e-3)
    assert ours[-1].hardware_id == Bundle.load(node_run["bundle"]).model_sha256[:16]


def _declared_defaults(bundle_dir) -> dict:
    """The node's parameters and their values when only bundle_dir is given."""
    from usn_keypoint_ros.node import KeypointNode

    rclpy.init()
    try:
        node = KeypointNode(parameter_overrides=[rclpy.parameter.Parameter("bundle_dir", value=str(bundle_dir))])
        values = {name: param.value for name, param in node._parameters.items()}
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    return values


def _declared_parameters(bundle_dir) -> set[str]:
    return set(_declared_defaults(bundle_dir))


def test_the_node_declares_exactly_its_parameter_table(exported_bundle):
    """The declarative table (usn_offline/runtime/node_parameters.py) is what the node declares:
    names, defaults and read-only flags; besides it only the bundle's keypoint_names and
    rclpy's own."""
    from usn_keypoint_ros.node import KeypointNode

    from usn_offline.runtime.node_parameters import PARAMETERS

    table = {spec.name: spec for spec in PARAMETERS}
    rclpy.init()
    try:
        node = KeypointNode(parameter_overrides=[rclpy.parameter.Parameter("bundle_dir", value=str(exported_bundle))])
        declared = {name: param.value for name, param in node._parameters.items()}
        read_only = {name: node.describe_parameter(name).read_only for name in table}
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
    assert set(declared) - set(table) <= {"keypoint_names", "use_sim_time", "start_type_description_service"}
    assert "keypoint_names" in declared
    differing = {name: (declared[name], spec.default) for name, spec in table.items()
                 if name != "bundle_dir" and declared[name] != spec.default}
    assert not differing, differing
    assert read_only == {name: spec.read_only for name, spec in table.items()}


def test_params_yaml_and_launch_file_set_only_declared_parameters(exported_bundle):
    defaults = _declared_defaults(exported_bundle)
    declared = set(defaults)
    params = yaml.safe_load(PARAMS.read_text())["usn_keypoint_node"]["ros__parameters"]
    assert set(params) <= declared, set(params) - declared
    # One place for each default: the shipped YAML states the node's own defaults.
    differing = {k: (v, defaults[k]) for k, v in params.items()
                 if (list(v) if isinstance(v, list) else v) != (list(defaults[k]) if isinstance(
                     defaults[k], (list, tuple)) else defaults[k])}
    assert not differing, differing
    tree = ast.parse(LAUNCH.read_text())
    node_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Node")
    param_dicts = [d for kw in node_call.keywords if kw.arg == "parameters"
                   for d in ast.walk(kw.value) if isinstance(d, ast.Dict)]
    keys = {k.value for d in param_dicts for k in d.keys}
    assert keys and keys <= declared, keys - declared
    launch_args = {n.args[0].value for n in ast.walk(tree)
                   if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "DeclareLaunchArgument"}
    assert {"bundle_dir", "params_file", "image_topic", "use_sim_time", "backend"} <= launch_args


def _documented(heading: str) -> set[str]:
    """The first-column names of the table under ``## heading`` in docs/ROS.md."""
    text = (REPO / "docs" / "ROS.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", section, re.MULTILINE)}


def test_the_docs_describe_every_parameter_and_launch_argument(exported_bundle):
    """docs/ROS.md's parameter table lists exactly the parameters the node declares, and
    its launch-argument table exactly the launch file's arguments."""
    assert _documented("Parameters") == _declared_parameters(exported_bundle)
    tree = ast.parse(LAUNCH.read_text())
    launch_args = {n.args[0].value for n in ast.walk(tree)
                   if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "DeclareLaunchArgument"}
    assert _documented("Launch arguments") == launch_args


def test_node_refuses_to_start_without_a_valid_bundle(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "-p",
                           f"bundle_dir:={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usn_keypoint_node: error: bundle is missing manifest.json" in proc.stderr


@pytest.mark.parametrize("param, message", [
    ("max_image_pixels:=0", "parameter max_image_pixels:"),
    ("monitor_z:=abc", "parameter monitor_z:"),
    ("frame_proof_lighting:=[1,2,3,4]", "floating-point parameters take 1.0, not 1"),
    ("model_file_path:=/nonexistent/model.onnx", "model_file_path /nonexistent/model.onnx: no such file"),
    # an unset variable in a launch file must not read as "no keys": that would skip the check
    ("trusted_keys:=['']", "has an empty entry"),
])
def test_node_refuses_bad_parameters_in_one_line(exported_bundle, param, message):
    proc = subprocess.run([sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "-p",
                           f"bundle_dir:={exported_bundle}", "-p", "frame_proof:=false", "-p", param],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("usn_keypoint_node: error: ")


def test_backend_torch_refuses_or_flags_a_checkpoint_the_certificate_does_not_name(exported_bundle, tmp_path):
    """A checkpoint other than the certified one is the served model changing: refused by
    default, served with every frame flagged under on_certificate_mismatch:=flag."""
    import torch

    from usn_offline.train import load_checkpoint, save_checkpoint

    model, info = load_checkpoint(exported_bundle.parent / "m.pt")
    with torch.no_grad():
        next(model.parameters()).flatten()[0] += 0.5
    other = save_checkpoint(tmp_path / "other.pt", model, info)
    args = [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "-p", f"bundle_dir:={exported_bundle}",
            "-p", "frame_proof:=false", "-p", "backend:=torch", "-p", f"checkpoint_path:={other}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "is not the checkpoint the certificate was issued for" in proc.stderr.strip().splitlines()[-1]
    log = log_until([*args, "-p", "on_certificate_mismatch:=flag"], tmp_path / "node.log", "backend: torch")
    assert "checkpoint does not match the certificate: every frame is flagged" in log and "backend: torch" in log


def test_a_proof_range_narrower_than_the_certificate_is_said_at_start(exported_bundle, tmp_path):
    args = [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "--params-file", str(PARAMS),
            "-p", f"bundle_dir:={exported_bundle}", "-p", f"frame_proof_lighting:={list(LIGHTING)}"]
    log = log_until(args, tmp_path / "node.log", "scene check:")  # logged after the range is checked
    assert ("frame proofs cover lighting a in [0.97, 1.03], b in [-0.03, 0.03] (frame_proof_lighting), narrower "
            "than the certificate's a in [0.9, 1.1], b in [-0.1, 0.1]") in log
    log = log_until(args[:-2], tmp_path / "node.log", "scene check:")  # the certificate's own box
    assert "narrower than the certificate's" not in log and "scene check:" in log


def test_compressed_transport(exported_bundle):
    """input_transport:=compressed: PNG frames on <remapped image>/compressed; a corrupt one is BAD_INPUT."""
    from sensor_msgs.msg import CompressedImage

    cmd = [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "-p", f"bundle_dir:={exported_bundle}",
           "-p", "input_transport:=compressed", "-p", "input_qos:=DEFAULT", "-r", "image:=/usn_test/cam2/image"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ok, png = cv2.imencode(".png", _scene()[:, :, ::-1])
    good = CompressedImage(format="png", data=png.tobytes())
    good.header.stamp.sec = 1
    bad = CompressedImage(format="jpeg", data=b"\xff\xd8 definitely not a jpeg")
    bad.header.stamp.sec = 2
    statuses, keypoints = [], []
    rclpy.init()
    try:
        node = Node("usn_test_compressed_camera")
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        pub = node.create_publisher(CompressedImage, "/usn_test/cam2/image/compressed", qos)
        node.create_subscription(CertificationStatus, "/usn_keypoint_node/status", statuses.append, qos)
        node.create_subscription(KeypointArray, "/usn_keypoint_node/keypoints", keypoints.append, qos)
        _wait_for_node(node, pub, proc)
        pub.publish(good)
        pub.publish(bad)
        spin_until(node, lambda: len(statuses) >= 2, 30)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        err = stop(proc)
    by_stamp = {s.header.stamp.sec: s for s in statuses}
    assert set(by_stamp) == {1, 2}, err
    assert CertificationStatus.BAD_INPUT not in by_stamp[1].reasons
    assert list(by_stamp[2].reasons) == [CertificationStatus.BAD_INPUT]
    assert "cannot decode compressed image" in by_stamp[2].detail
    assert [k.header.stamp.sec for k in keypoints] == [1] and len(keypoints[0].keypoints) == 4
