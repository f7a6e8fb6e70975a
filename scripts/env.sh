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
# The packages built from ros2_ws (ROS installs source ros2_ws/install/setup.bash instead).
for _usn_ws in "$_usn_repo"/ros2_ws/install/*/; do
    [[ -d "$_usn_ws/share" ]] || continue
    _usn_ws="${_usn_ws%/}"
    export AMENT_PREFIX_PATH="$_usn_ws:${AMENT_PREFIX_PATH:-$_usn_venv}"
    [[ -d "$_usn_ws/lib" ]] && export LD_LIBRARY_PATH="$_usn_ws/lib:$LD_LIBRARY_PATH"
    for d in "$_usn_ws"/lib/python3*/site-packages; do
        [[ -d "$d" ]] && export PYTHONPATH="$d${PYTHONPATH:+:$PYTHONPATH}"
    done
done
unset _usn_repo _usn_venv _usn_libs _usn_ws d
