"""`ros2 launch` as a user runs it: the shipped launch file and parameters (SENSOR_DATA
QoS), the Fast DDS profile the launch file sets, camera-size frames from a camera-like
publisher at a camera's rate, one status per frame, and a clean exit on Ctrl-C."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
pytest.importorskip("launch_ros", reason="launch_ros is not installed (setup installs it from ../shared/wheels)")
if shutil.which("ros2") is None:
    pytest.skip("the ros2 command (ros2cli) is not installed", allow_module_level=True)

import psutil  # noqa: E402  (ros2cli's dependency)
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import spin_until  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from usn_keypoint_msgs.msg import CertificationStatus  # noqa: E402

# (width, height, frames, the camera's reliability): camera drivers publish reliable or best effort.
SIZES = ((640, 480, 10, ReliabilityPolicy.RELIABLE), (1280, 720, 5, ReliabilityPolicy.RELIABLE),
         (640, 480, 5, ReliabilityPolicy.BEST_EFFORT), (1280, 720, 5, ReliabilityPolicy.BEST_EFFORT))
SHIPPED_PARAMS = Path(__file__).resolve().parents[1] / "launch" / "usn_keypoint_node.params.yaml"


def _frames():
    rng = np.random.default_rng(0)
    for width, height, count, reliability in SIZES:
        for _ in range(count):
            yield reliability, rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _parameters(node, names: list[str]) -> dict:
    """The running node's values of ``names``, read over its parameter services."""
    from rclpy.parameter import parameter_value_to_python
    from rclpy.parameter_client import AsyncParameterClient

    client = AsyncParameterClient(node, "usn_keypoint_node")
    assert client.wait_for_services(timeout_sec=20)
    future = client.get_parameters(names)
    rclpy.spin_until_future_complete(node, future, timeout_sec=20)
    return {n: parameter_value_to_python(v) for n, v in zip(names, future.result().values, strict=True)}


def test_ros2_launch_serves_camera_size_frames_and_exits_cleanly(exported_bundle, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTDDS_DEFAULT_PROFILES_FILE"}  # the launch file sets it
    # A user's copy of the shipped parameters with one change, and the other launch arguments.
    params = tmp_path / "robot.params.yaml"
    params.write_text(SHIPPED_PARAMS.read_text().replace("frame_proof_every: 1 ", "frame_proof_every: 4 "))
    assert params.read_text() != SHIPPED_PARAMS.read_text()
    engine = tmp_path / "robot.engine"
    launch = subprocess.Popen(["ros2", "launch", "usn_keypoint_ros", "usn_keypoint_node.launch.py",
                               f"bundle_dir:={exported_bundle}", "image_topic:=/usn_launch/camera/image_raw",
                               f"params_file:={params}", "backend:=onnxruntime", f"engine_file_path:={engine}",
                               "use_sim_time:=true"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    statuses = []
    rclpy.init()
    try:
        node = Node("usn_launch_test_camera")
        # Camera drivers: keep last 5, reliable or best effort, publishing at their own rate.
        pubs = {r: node.create_publisher(Image, "/usn_launch/camera/image_raw", QoSProfile(depth=5, reliability=r))
                for r in (ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT)}
        pub = pubs[ReliabilityPolicy.RELIABLE]
        node.create_subscription(CertificationStatus, "/usn_keypoint_node/status", statuses.append,
                                 QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        spin_until(node, lambda: pub.get_subscription_count() > 0
                   and node.count_publishers("/usn_keypoint_node/status") > 0, 90, launch)
        assert launch.poll() is None, launch.stdout.read().decode()[-3000:]
        spin_until(node, lambda: False, 0.5)
        children = psutil.Process(launch.pid).children(recursive=True)
        profile = [p.environ().get("FASTDDS_DEFAULT_PROFILES_FILE") for p in children
                   if "keypoint_node" in " ".join(p.cmdline())]
        assert profile and profile[0].endswith("share/usn_keypoint_ros/launch/fastdds_large_frames.xml")
        # The launch arguments took effect.
        assert _parameters(node, ["backend", "frame_proof_every", "engine_file_path", "use_sim_time",
                                  "input_qos"]) == {
            "backend": "onnxruntime", "frame_proof_every": 4, "engine_file_path": str(engine),
            "use_sim_time": True, "input_qos": "SENSOR_DATA"}
        sent = 0
        for i, (reliability, frame) in enumerate(_frames()):
            msg = Image(height=frame.shape[0], width=frame.shape[1], encoding="rgb8", is_bigendian=0,
                        step=frame.shape[1] * 3, data=frame.tobytes())
            msg.header.stamp.sec, msg.header.frame_id = 1000 + i, "camera"
            pubs[reliability].publish(msg)
            sent += 1
            end = time.monotonic() + 0.1  # 10 frames/s
            while time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=0.01)
        spin_until(node, lambda: len(statuses) >= sent, 30)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        try:
            output = launch.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            output = launch.communicate()[0].decode()
    assert sorted(s.header.stamp.sec for s in statuses) == list(range(1000, 1000 + sent)), output[-3000:]
    assert launch.returncode == 0, output[-3000:]
    assert "process has finished cleanly" in output and "Traceback" not in output, output[-3000:]
