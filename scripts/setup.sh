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

command -v "$python" >/dev/null 2>&1 || die "'$python' not found; install Python 3.10+ (e.g. apt-get install python3)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "Python >= 3.10 required, found $("$python" --version 2>&1)"

want="$(cat "$repo/requirements.txt" "$repo/pyproject.toml" "$repo/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
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

pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# The ROS 2 wheels install a .pth hook that re-executes every interpreter once to set
# LD_LIBRARY_PATH; setting its guard and the path here avoids the double start.
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
log="$venv/setup.log"
echo "setup: installing pinned dependencies (requirements.txt; log: $log)"
install() {
    if ! "${pip[@]}" install "$@" >>"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "pip install $* failed (full log: $log)"
    fi
}
: > "$log"
install --upgrade "pip>=24" "setuptools>=77" wheel
install -r "$repo/requirements.txt"
# compat mode: a plain path entry, so new sub-packages need no reinstall.
install --no-build-isolation --no-deps --config-settings editable_mode=compat -e "$repo"

echo "$want" > "$stamp"
echo "setup: done ($venv)"
