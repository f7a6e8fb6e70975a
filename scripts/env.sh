# Source-able environment for running the project's tools from .venv.
# The ROS 2 PyPI wheels need their bundled libraries on LD_LIBRARY_PATH; their .pth hook
# would otherwise re-exec every Python process to set it. DDS stays on loopback.
_usn_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_usn_venv="${USN_VENV:-$_usn_repo/.venv}"
_usn_libs="$_usn_venv/lib"
for d in "$_usn_venv"/lib/python3*/site-packages/ros_*.libs; do
    [[ -d "$d" ]] && _usn_libs="$_usn_libs:$d"
done
export LD_LIBRARY_PATH="$_usn_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export PATH="$_usn_venv/bin:$PATH"
# The message package built from ros2_ws (ROS installs source its setup.bash instead).
_usn_ws="$_usn_repo/ros2_ws/install/usn_keypoint_msgs"
if [[ -d "$_usn_ws" ]]; then
    export AMENT_PREFIX_PATH="$_usn_ws:$_usn_venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
    export LD_LIBRARY_PATH="$_usn_ws/lib:$LD_LIBRARY_PATH"
    for d in "$_usn_ws"/lib/python3*/site-packages; do
        [[ -d "$d" ]] && export PYTHONPATH="$d${PYTHONPATH:+:$PYTHONPATH}"
    done
fi
unset _usn_repo _usn_venv _usn_libs _usn_ws d
