"""Where the files shipped beside the Python package are (torch-free): a folder of the
source checkout (``launch/``, ``msg/``), else the same folder of the installed ROS package
(``<prefix>/share/<package>/<folder>`` for each prefix on ``AMENT_PREFIX_PATH``: a ROS
install, the Docker image)."""

from __future__ import annotations

import os
from pathlib import Path

NODE_PACKAGE = "usn_keypoint_ros"
MESSAGE_PACKAGE = "usn_keypoint_msgs"
PARAMS_FILE = "usn_keypoint_node.params.yaml"


def shipped_folders(folder: str, package: str) -> list[Path]:
    """Candidate locations of ``folder``, the source checkout's first."""
    candidates = [Path(__file__).resolve().parents[2] / folder]
    candidates += [Path(prefix) / "share" / package / folder
                   for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if prefix]
    return candidates


def shipped_launch_file(name: str) -> Path | None:
    """A file of ``launch/`` (the node package's), or None when it is nowhere."""
    return next((path for path in (d / name for d in shipped_folders("launch", NODE_PACKAGE)) if path.is_file()),
                None)
