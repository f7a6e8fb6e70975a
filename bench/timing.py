"""Shared timing helper of the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 3, cuda: bool = False,
                   setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeat`` calls after ``warmup`` calls; with ``cuda``
    each call is timed up to the end of the GPU work it queued (kernels run asynchronously);
    ``setup`` runs before each call, untimed."""
    sync = _cuda_synchronize if cuda else _nothing
    setup = setup or _nothing
    for _ in range(warmup):
        setup()
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        setup()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _nothing() -> None:
    return None


def _cuda_synchronize() -> None:
    import torch

    torch.cuda.synchronize()
