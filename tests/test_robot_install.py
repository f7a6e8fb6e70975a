"""The robot install as the Dockerfile builds it without torch (FRAME_PROOFS=0), standing in
for the image, which cannot be built here: `.venv-robot` (scripts/setup.sh) holds exactly
scripts/robot_requirements.txt and the project installed like the Dockerfile installs it.
The node is started from it with the shipped parameter file and serves camera-size frames
over DDS (SENSOR_DATA QoS, reliable and best-effort cameras)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ROBOT_VENV = Path(os.environ.get("USN_ROBOT_VENV", REPO / ".venv-robot"))
ROBOT_PYTHON = ROBOT_VENV / "bin" / "python"
# What the offline stack needs and the robot image must not hold.
OFFLINE_ONLY = ("torch", "onnx", "scipy", "skimage", "matplotlib", "tqdm", "rosbags", "auto_LiRPA")

pytestmark = pytest.mark.skipif(not ROBOT_PYTHON.exists(),
                                reason=f"{ROBOT_VENV} is missing: scripts/setup.sh builds it")


def _robot_env() -> dict[str, str]:
    """This process's environment without the development venv (its paths and libraries)."""
    dev_venv = os.environ.get("VIRTUAL_ENV", str(REPO / ".venv"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LD_LIBRARY_PATH", "AMENT_PREFIX_PATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if not p.startswith(dev_venv))
    return env


def _robot(command: str, cwd: Path, **kwargs) -> subprocess.Popen:
    """Run ``command`` in the robot environment (scripts/env.sh for .venv-robot), from ``cwd``
    so that the repository's sources are not on the path: the installed package is used."""
    script = f"USN_VENV={ROBOT_VENV} source {REPO}/scripts/env.sh && cd {cwd} && exec {command}"
    return subprocess.Popen(["bash", "-c", script], env=_robot_env(), **kwargs)


def test_the_robot_install_holds_the_runtime_and_nothing_of_the_offline_stack(tmp_path):
    code = ("import importlib.util as u, usn_offline; "
            f"print([m for m in {OFFLINE_ONLY!r} if u.find_spec(m)]); "
            "print(usn_offline.__file__)")
    proc = _robot(f"python -c {shlex.quote(code)}", tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    present, location = out.strip().splitlines()
    assert present == "[]"
    assert location.startswith(str(ROBOT_VENV)), location  # the installed copy, not the sources


def test_bundle_signatures_are_verified_on_the_robot(exported_bundle, tmp_path):
    """`usn-offline verify` runs in the torch-free install: a bundle signed by the trusted
    key passes, the same bundle against another key does not."""
    import shutil

    from usn_offline.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(exported_bundle, bundle)
    assert main(["keygen", "--out", str(tmp_path / "release")]) == 0
    assert main(["keygen", "--out", str(tmp_path / "other")]) == 0
    assert main(["sign", "--bundle", str(bundle), "--key", str(tmp_path / "release")]) == 0
    for key, expected in (("release.pub", 0), ("other.pub", 2)):
        proc = _robot(f"usn-offline verify --bundle {bundle} --trusted-key {tmp_path / key}", tmp_path,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == expected, (key, out, err)
        assert "Traceback" not in err


def test_the_robot_install_matches_the_dockerfile():
    """The list the venv is built from is the Dockerfile's: its onnxruntime version, and a
    PyPI stand-in for each Python package it takes from apt."""
    dockerfile = (REPO / "Dockerfile").read_text()
    lines = (REPO / "scripts" / "robot_requirements.txt").read_text().splitlines()
    wanted = "\n".join(line for line in lines if line.strip() and not line.startswith("#"))
    version = re.search(r"ARG ONNXRUNTIME_VERSION=(\S+)", dockerfile).group(1)
    assert f"onnxruntime=={version}" in wanted
    for apt, pypi in (("python3-opencv", "opencv-python-headless=="), ("python3-yaml", "pyyaml=="),
                      ("python3-cryptography", "cryptography==")):
        assert apt in dockerfile and pypi in wanted
    names = {re.split(r"[=\[]", line)[0] for line in wanted.splitlines()}
    assert not names & {"torch", "onnx", "tqdm", "scipy", "scikit-image", "matplotlib"}, names


def test_the_node_serves_camera_frames_from_the_robot_install(exported_bundle, tmp_path):
    rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from ros_helpers import spin_until, stop
    from sensor_msgs.msg import Image
    from usn_keypoint_msgs.msg import CertificationStatus, KeypointArray

    params = REPO / "launch" / "usn_keypoint_node.params.yaml"
    proc = _robot(f"python -m usn_keypoint_ros.node --ros-args --params-file {params} "
                  f"-p bundle_dir:={exported_bundle} -r image:=/usn_robot/camera/image_raw",
                  tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rng = np.random.default_rng(0)
    statuses, keypoints, sent = [], [], []
    rclpy.init()
    try:
        node = Node("usn_robot_test_camera")
        reliable = node.create_publisher(Image, "/usn_robot/camera/image_raw",
                                         QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        best_effort = node.create_publisher(Image, "/usn_robot/camera/image_raw",
                                            QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT))
        out_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(CertificationStatus, "/usn_keypoint_node/status", statuses.append, out_qos)
        node.create_subscription(KeypointArray, "/usn_keypoint_node/keypoints", keypoints.append, out_qos)
        spin_until(node, lambda: reliable.get_subscription_count() > 0
                   and node.count_publishers("/usn_keypoint_node/status") > 0, 90, proc)
        assert proc.poll() is None, stop(proc)
        spin_until(node, lambda: False, 0.5)
        stamp = 2000
        for pub, (width, height) in ((reliable, (640, 480)), (best_effort, (1280, 720)), (reliable, (1280, 720))):
            for _ in range(4):
                frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                msg = Image(height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3,
                            data=frame.tobytes())
                msg.header.stamp.sec, msg.header.frame_id = stamp, "camera"
                pub.publish(msg)
                sent.append(stamp)
                stamp += 1
                spin_until(node, lambda s=stamp: len(statuses) >= len(sent), 10, proc)  # camera pace
        spin_until(node, lambda: len(statuses) >= len(sent) and len(keypoints) >= len(sent), 30, proc)
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        err = stop(proc)
    assert sorted(s.header.stamp.sec for s in statuses) == sent, err
    assert sorted(k.header.stamp.sec for k in keypoints) == sent, err
    # Without torch there are no per-frame proofs: nothing is certified, and the node says why.
    assert not any(s.certified for s in statuses)
    assert "Traceback" not in err and "torch" in err, err
