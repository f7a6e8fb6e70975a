"""How a process uses the machine: the cores it may run on, and the memory it frees.

Keeping freed memory (:func:`keep_freed_memory`), for the processes that bound: a bound
computation allocates and frees tensors of tens to hundreds of megabytes per
layer. By default glibc serves such blocks with ``mmap`` and gives them back to the
system when freed (and trims its heaps when their top is free), so each new tensor faults
its pages in again: on the quick demo model, one CROWN box at eps 0.05 cost 1.3 million
page faults and 2.3 s of system time out of 2.8 s; with the settings below, none and
0.03 s, 1.6 s in all (``bench/certify_bench.py`` runs its verifiers with them too). They
are the two settings real-time Linux programs make for the same reason. The cost:
the process keeps its peak memory until it exits, which suits a command that certifies
and ends, or a prover that proves one frame after another.

Torch-free: the node's runtime uses it as well as training and certification.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # malloc.h: give free heap memory back above this; -1: never
_M_MMAP_MAX = -4  # malloc.h: how many blocks may be served by mmap at once; 0: none


def keep_freed_memory() -> bool:
    """Serve every allocation from malloc's heaps and never give freed memory back to the
    system. Returns whether it applied: glibc on Linux; elsewhere (another C library or
    system) it changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl's mallopt exists and returns 0: nothing applied
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1


def usable_cores() -> int:
    """How many cores this process may run on (its CPU affinity; all of them elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
