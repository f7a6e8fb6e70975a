"""keep_freed_memory: large blocks are reused without faulting their pages in again.

Counted in page faults (the kernel's count of the work), not in seconds."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux only")

_FAULTS = """
import resource, sys
import numpy as np
from usn_offline.resources import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def allocate():
    block = np.empty(64 * 2 ** 20, np.uint8)  # 64 MiB, as large as a bound's tensors get
    block.fill(1)  # touch every page
allocate()  # the first allocation faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    allocate()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


def test_freed_memory_is_reused_without_page_faults():
    applied, kept = _faults("keep")
    _, default = _faults("default")
    if applied != "True":
        pytest.skip("not glibc: mallopt changed nothing")
    # By default each 64 MiB block is mapped afresh and faults in again: at least one fault
    # per 2 MiB huge page (32 per block), 4 KiB pages give 16384; kept, almost none.
    assert default >= 10 * 32
    assert kept <= 50 < default
