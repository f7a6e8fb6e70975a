"""Search for counterexamples: concrete (a, b) in a box that break the property
(box centre and corners, then projected gradient ascent from several starts)."""

from __future__ import annotations

import torch

from usn_offline.certify.bounds import PixelMap
from usn_offline.certify.boxes import Boxes
from usn_offline.certify.graph import Graph
from usn_offline.certify.spec import KeypointProperty


def deviations_at(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
                  a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest keypoint deviation (pixels) at each concrete (a, b); a, b of shape (N,)."""
    with torch.no_grad():
        return prop.deviation(pixels(graph.evaluate(image, a, b)))


def pgd_attack(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
               boxes: Boxes, restarts: int = 8, steps: int = 10, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximise the deviation over each box. Returns (a, b, deviation), each (B,), the
    worst point found per box (corners and centre are always among the candidates)."""
    n = len(boxes)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lo = torch.stack([boxes.a_lo, boxes.b_lo], dim=1)  # (B, 2)
    hi = torch.stack([boxes.a_hi, boxes.b_hi], dim=1)
    ca, cb = boxes.corners()
    ma, mb = boxes.centres()
    fixed = torch.stack([torch.cat([ca, ma[:, None]], 1), torch.cat([cb, mb[:, None]], 1)], dim=2)  # (B,5,2)
    rand = torch.rand(n, restarts, 2, generator=gen, dtype=lo.dtype).to(lo.device)
    starts = torch.cat([fixed, lo[:, None] + rand * (hi - lo)[:, None]], dim=1)  # (B, R, 2)
    r = starts.shape[1]
    best_dev = torch.full((n,), -float("inf"), dtype=lo.dtype, device=lo.device)
    best_pt = starts[:, 0].clone()
    point = starts.reshape(n * r, 2).clone()
    lo_r, hi_r = lo.repeat_interleave(r, 0), hi.repeat_interleave(r, 0)
    step = (hi_r - lo_r) / 4
    for it in range(steps + 1):
        point.requires_grad_(True)
        with torch.enable_grad():
            dev = prop.deviation(pixels(graph.evaluate(image, point[:, 0], point[:, 1])))
            grad = torch.autograd.grad(dev.sum(), point)[0] if it < steps else None
        with torch.no_grad():
            per_box = dev.detach().view(n, r)
            top, arg = per_box.max(dim=1)
            better = top > best_dev
            best_dev = torch.where(better, top, best_dev)
            cand = point.detach().view(n, r, 2)[torch.arange(n), arg]
            best_pt = torch.where(better[:, None], cand, best_pt)
            if grad is None:
                break
            point = torch.minimum(torch.maximum(point.detach() + step * grad.sign(), lo_r), hi_r)
            step = step * 0.7
    return best_pt[:, 0], best_pt[:, 1], best_dev
