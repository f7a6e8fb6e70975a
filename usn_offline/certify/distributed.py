"""Certify images on Ray workers: a local Ray instance, or an existing cluster.

Each worker is a Ray actor holding the lowered graph (lowered once per worker) and
certifies one image per task; a CPU worker uses one core (``torch.set_num_threads(1)``),
a CUDA run asks one GPU per worker. Results come back as they finish, in any order; the
caller journals them and assembles the report in image order, so the report equals a
serial run's apart from timings. A worker that dies is restarted and its image retried;
an image whose certification raises is named in the error, after the images in flight
have come back.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from usn_offline.certify.engine import CertifyConfig, ImageCertifier, ImageResult, ParallelConfig
from usn_offline.certify.errors import CertificationError
from usn_offline.resources import keep_freed_memory


class _Worker:
    """One Ray actor: an :class:`ImageCertifier` on this worker's device."""

    def __init__(self, model: torch.nn.Module, image_hw: tuple[int, int], num_keypoints: int,
                 config: CertifyConfig, device: str) -> None:
        self.one_core = torch.device(device).type == "cpu"
        keep_freed_memory()
        self._pin_threads()
        self.certifier = ImageCertifier(model, image_hw, num_keypoints, config, device)

    def _pin_threads(self) -> None:
        # One core per worker: workers, not threads, share the CPUs. OpenMP's thread count is
        # per calling thread, and Ray may run methods on another thread than the constructor,
        # so it is set for every call (measured: without it each worker ran 2 threads and 2
        # workers on 2 cores were no faster than 1).
        if self.one_core:
            torch.set_num_threads(1)

    def certify(self, index: int, file_name: str, image: np.ndarray, reference: np.ndarray) -> ImageResult:
        self._pin_threads()
        return self.certifier.certify(index, file_name, image, reference)


def _start_ray(parallel: ParallelConfig) -> bool:
    """Connect to ``ray_address`` or start a local instance; True when this call started it."""
    try:
        import ray
    except ImportError as exc:
        raise CertificationError("--workers/--ray-address need Ray (pip install 'ray==2.60.0')") from exc
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if parallel.ray_address is None:
        ray.init(num_cpus=parallel.workers, **options)
    else:
        try:
            ray.init(address=parallel.ray_address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise CertificationError(f"cannot join the Ray cluster at {parallel.ray_address}: {exc}") from exc
    return True


def certify_on_ray(model: torch.nn.Module, dataset, references: np.ndarray, config: CertifyConfig,
                   device: torch.device | str, todo: list[int], parallel: ParallelConfig) -> Iterator[ImageResult]:
    """Certify images ``todo`` of ``dataset`` on ``parallel.workers`` Ray workers, yielding
    each result as it finishes."""
    import ray

    if not todo:
        return
    started_here = _start_ray(parallel)
    device = str(device)
    gpus = 1 if torch.device(device).type == "cuda" else 0
    count = parallel.workers
    if parallel.ray_address is not None and count == 1:  # a cluster: as many workers as it has CPUs (GPUs)
        count = max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1)))
    actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=2, max_task_retries=2)(_Worker)
    model_ref = ray.put(model)
    workers = [actor.remote(model_ref, dataset.image_hw, dataset.num_keypoints, config, device)
               for _ in range(min(count, len(todo)))]
    pending: dict = {}
    queue = list(todo)
    failures: list[str] = []

    def submit(worker) -> None:
        i = queue.pop(0)
        ref = worker.certify.remote(i, dataset.file_names[i], dataset.images[i], references[i])
        pending[ref] = (i, worker)

    try:
        for worker in workers:
            if queue:
                submit(worker)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, worker = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                failures.append(f"image {i} ({dataset.file_names[i]}): {type(cause).__name__}: "
                                f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}")
                queue.clear()  # stop handing out work; let the images in flight finish
                continue
            if queue:
                submit(worker)
            yield result
    finally:
        for worker in workers:
            ray.kill(worker)
        if started_here:
            ray.shutdown()
    if failures:
        raise CertificationError(f"certification failed on {len(failures)} image(s): " + "; ".join(failures))
