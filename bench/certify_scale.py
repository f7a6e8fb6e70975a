"""Certification throughput across Ray workers: images per second with 2 (or more)
workers, each on one core, against one core (the serial run in this process with one
thread: a worker's arithmetic, without Ray) and against the serial run with all threads.

    source scripts/env.sh && python bench/certify_scale.py --checkpoint runs/demo/pruned.pt --data runs/demo/data
"""

from __future__ import annotations

import argparse
import time

import torch

from usn_offline.certify import CertifyConfig, ParallelConfig, certify_dataset
from usn_offline.data import load_split
from usn_offline.perturb import PhotometricBox
from usn_offline.train import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/pruned.pt")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--eps", type=float, default=0.03, help="the box a in [1-eps, 1+eps], b in [-eps, eps]")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    model, info = load_checkpoint(args.checkpoint)
    test = load_split(args.data, "test", info.preprocess).subset(slice(0, args.images))
    config = CertifyConfig(box=PhotometricBox.symmetric(args.eps, args.eps), delta=2.0, eps_list=(0.01, 0.02))
    rows = []
    all_threads = torch.get_num_threads()
    runs = [("one core (1 worker)", ParallelConfig(), 1), ("serial, all threads", ParallelConfig(), all_threads)]
    runs += [(f"Ray, {n} workers", ParallelConfig(workers=n), 1) for n in args.workers if n > 1]
    reference = None
    for label, parallel, threads in runs:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        report = certify_dataset(model, test, config, progress=False, parallel=parallel)
        seconds = time.perf_counter() - start
        statuses = [r.status for r in report.images]
        reference = reference or statuses
        rows.append((label, threads, len(test) / seconds, seconds, statuses == reference))
    torch.set_num_threads(all_threads)
    base = rows[0][2]
    print(f"{args.checkpoint}: {len(test)} images, box +-{args.eps:g}, delta 2 px, eps 0.01 0.02 "
          f"(Ray start-up included)")
    print(f"{'run':>22} | threads per process | images/s | seconds | vs one core | same statuses")
    for label, threads, rate, seconds, same in rows:
        print(f"{label:>22} | {threads:19d} | {rate:8.2f} | {seconds:7.1f} | {rate / base:10.2f}x | {same}")


if __name__ == "__main__":
    main()
