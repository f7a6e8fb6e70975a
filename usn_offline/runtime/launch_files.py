"""Where the shipped launch/ files are (torch-free): the repository's ``launch/`` in a source
checkout, else the installed node package's ``share/usn_keypoint_ros/launch`` on
``AMENT_PREFIX_PATH`` (a ROS install, the Docker image)."""

from __future__ import annotations

import os
from pathlib import Path

NODE_PACKAGE = "usn_keypoint_ros"
PARAMS_FILE = "usn_keypoint_node.params.yaml"


def shipped_launch_file(name: str) -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "launch" / name]
    candidates += [Path(prefix) / "share" / NODE_PACKAGE / "launch" / name
                   for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if prefix]
    return next((path for path in candidates if path.is_file()), None)
