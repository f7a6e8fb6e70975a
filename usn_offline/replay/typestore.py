"""The ROS message types of our bags for the ``rosbags`` library: ROS 2 Kilted's standard
types plus ours, parsed from the same ``.msg`` sources the ROS package is built from."""

from __future__ import annotations

from pathlib import Path

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from usn_offline.errors import ReplayError
from usn_offline.runtime.shipped import MESSAGE_PACKAGE, shipped_folders

PACKAGE = MESSAGE_PACKAGE
OUR_MESSAGES = ("Keypoint2D", "KeypointArray", "CertificationStatus", "FrameTruth")

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CLOCK = "rosgraph_msgs/msg/Clock"
FRAME_TRUTH = f"{PACKAGE}/msg/FrameTruth"
KEYPOINT_ARRAY = f"{PACKAGE}/msg/KeypointArray"
CERTIFICATION_STATUS = f"{PACKAGE}/msg/CertificationStatus"


def message_directory() -> Path:
    """Where the ``.msg`` sources are: the repository's ``msg/`` (source checkout), else the
    built package's ``share/usn_keypoint_msgs/msg`` on ``AMENT_PREFIX_PATH`` (a ROS install)."""
    for folder in shipped_folders("msg", PACKAGE):
        if all((folder / f"{name}.msg").is_file() for name in OUR_MESSAGES):
            return folder
    raise ReplayError(f"cannot find the {PACKAGE} message definitions ({', '.join(OUR_MESSAGES)}.msg): "
                      "run from a source checkout, or source the ROS workspace that built them")


def our_message_definitions() -> dict[str, str]:
    """``{"usn_keypoint_msgs/msg/Name": msg text}`` of our messages."""
    folder = message_directory()
    return {f"{PACKAGE}/msg/{name}": (folder / f"{name}.msg").read_text() for name in OUR_MESSAGES}


def replay_typestore() -> Typestore:
    """ROS 2 Kilted's types with ours registered."""
    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for name, text in our_message_definitions().items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store
