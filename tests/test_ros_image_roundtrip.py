"""A sensor_msgs/Image published by another process arrives intact over real DDS (loopback)."""

import os
import subprocess
import sys

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
from rclpy.node import Node  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from ros_helpers import spin_until, stop  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

PUBLISHER = r"""
import time
import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

rclpy.init()
node = Node("usn_test_image_publisher")
qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
pub = node.create_publisher(Image, "usn_test/image", qos)
rng = np.random.default_rng(7)
pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
msg = Image()
msg.header.frame_id = "camera_optical"
msg.header.stamp.sec, msg.header.stamp.nanosec = 1234, 5678
msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step = 48, 64, "rgb8", 0, 64 * 3
msg.data = pixels.tobytes()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    if pub.get_subscription_count() > 0:
        pub.publish(msg)
    time.sleep(0.05)
"""


def test_image_round_trip_between_processes():
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    received: list[Image] = []
    rclpy.init()
    try:
        node = Node("usn_test_image_subscriber")
        node.create_subscription(Image, "usn_test/image", received.append,
                                 QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        spin_until(node, lambda: bool(received), 30, proc)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        err = stop(proc, kill=True)
    assert received, f"no image received over DDS; publisher stderr: {err}"
    msg = received[0]
    expected = np.random.default_rng(7).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    assert (msg.height, msg.width, msg.encoding, msg.step) == (48, 64, "rgb8", 192)
    assert msg.header.frame_id == "camera_optical"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1234, 5678)
    np.testing.assert_array_equal(np.frombuffer(bytes(msg.data), np.uint8).reshape(48, 64, 3), expected)
