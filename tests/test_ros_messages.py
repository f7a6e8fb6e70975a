"""The message package built by the setup script imports and travels over real DDS."""

import math
import subprocess
import sys

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import spin_until, stop  # noqa: E402

try:
    from usn_keypoint_msgs.msg import CertificationStatus, KeypointArray
except ImportError as exc:  # pragma: no cover - explains the usual cause
    raise ImportError(f"{exc}: build ros2_ws (scripts/setup.sh) and `source scripts/env.sh`") from exc

PUBLISHER = r"""
import time
import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from usn_keypoint_msgs.msg import CertificationStatus, Keypoint2D, KeypointArray

rclpy.init()
node = Node("usn_test_msg_publisher")
qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
kp_pub = node.create_publisher(KeypointArray, "usn_test/keypoints", qos)
st_pub = node.create_publisher(CertificationStatus, "usn_test/status", qos)
kps = KeypointArray()
kps.header.frame_id = "camera_optical"
kps.header.stamp.sec = 42
kps.keypoints = [Keypoint2D(id=i, x=10.0 + i, y=20.5, score=float("nan")) for i in range(4)]
kps.model_sha256 = "ab" * 32
status = CertificationStatus()
status.header = kps.header
status.certified = False
status.contrast, status.brightness, status.margin = 1.3, -0.1, -0.05
status.reasons = [CertificationStatus.OUT_OF_REGION, CertificationStatus.SATURATED]
status.detail = "contrast outside [0.98, 1.02]"
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    if kp_pub.get_subscription_count() and st_pub.get_subscription_count():
        kp_pub.publish(kps)
        st_pub.publish(status)
    time.sleep(0.05)
"""


def test_custom_messages_round_trip_between_processes():
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    keypoints, statuses = [], []
    rclpy.init()
    try:
        node = Node("usn_test_msg_subscriber")
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(KeypointArray, "usn_test/keypoints", keypoints.append, qos)
        node.create_subscription(CertificationStatus, "usn_test/status", statuses.append, qos)
        spin_until(node, lambda: bool(keypoints and statuses), 30, proc)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        err = stop(proc, kill=True)
    assert keypoints and statuses, f"nothing received; publisher stderr: {err}"
    kps, status = keypoints[0], statuses[0]
    assert kps.header.frame_id == "camera_optical" and kps.header.stamp.sec == 42
    assert [k.id for k in kps.keypoints] == [0, 1, 2, 3]
    assert kps.keypoints[3].x == 13.0 and math.isnan(kps.keypoints[0].score)
    assert kps.model_sha256 == "ab" * 32
    assert not status.certified and status.header.stamp.sec == 42
    assert list(status.reasons) == [CertificationStatus.OUT_OF_REGION, CertificationStatus.SATURATED]
    assert status.contrast == pytest.approx(1.3) and status.detail.startswith("contrast outside")


def test_reason_codes_are_distinct():
    codes = [CertificationStatus.OUT_OF_REGION, CertificationStatus.SATURATED, CertificationStatus.BAD_INPUT,
             CertificationStatus.CERTIFICATE_MISMATCH, CertificationStatus.UNCERTAIN_ESTIMATE]
    assert len(set(codes)) == len(codes) and 0 not in codes
