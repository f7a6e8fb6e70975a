"""DDS transport settings under which camera-size frames arrive (torch-free, ROS-free).

Fast DDS's builtin shared-memory transport has a 512 KiB segment per process; a 640x480
rgb8 frame (900 KiB) does not fit, falls back to fragments that a best-effort
(``SENSOR_DATA``) subscription loses, and most frames never arrive. The shipped profile
``launch/fastdds_large_frames.xml`` gives every process a 16 MiB segment (plain UDPv4 is
kept for discovery and other hosts). The segment that matters is the *publisher's*: the
camera driver's process needs the profile too (the launch file sets it for every process
it starts).
"""

from __future__ import annotations

import os
from pathlib import Path

from usn_offline.runtime.shipped import shipped_launch_file

PROFILE_NAME = "fastdds_large_frames.xml"
PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"


def large_frame_profile() -> Path | None:
    """The shipped profile (see :func:`shipped_launch_file`), or None when it is not there."""
    return shipped_launch_file(PROFILE_NAME)


def large_frame_environment() -> dict[str, str]:
    """Environment for a process that publishes or receives camera frames: the shipped profile,
    unless the user already chose a Fast DDS profile (theirs wins) or another RMW."""
    if PROFILE_VARIABLE in os.environ or os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") != \
            "rmw_fastrtps_cpp":
        return {}
    profile = large_frame_profile()
    return {PROFILE_VARIABLE: str(profile)} if profile else {}
