"""Point the ROS 2 wheels' CMake exports at this interpreter's include directories.

The PyPI ROS 2 wheels are built in a manylinux container; their generated
``*__rosidl_generator_pyExport.cmake`` files name that container's Python and NumPy
include directories, so building a message package against them fails. Rewrite those
two paths (idempotent: a second run finds nothing to change).
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

import numpy

BUILD_PREFIX = re.compile(
    r"/opt/python/cp\d+-cp\d+/(include/python[\d.]+|lib/python[\d.]+/site-packages/numpy/_core/include)")


def replacement(match: re.Match) -> str:
    return sysconfig.get_paths()["include"] if match.group(1).startswith("include") else numpy.get_include()


def main(prefix: str) -> int:
    changed = 0
    for path in Path(prefix, "share").glob("*/cmake/*.cmake"):
        text = path.read_text()
        new = BUILD_PREFIX.sub(replacement, text)
        if new != text:
            path.write_text(new)
            changed += 1
    print(f"fix_ros_cmake_paths: rewrote {changed} CMake export file(s) under {prefix}/share")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else sys.prefix))
