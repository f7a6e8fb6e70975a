"""Sound bounds on every keypoint coordinate (in pixels) over a batch of (a, b) boxes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from usn_offline.certify.boxes import Boxes
from usn_offline.certify.crown import alpha_crown_lower, crown_lower
from usn_offline.certify.forward import propagate
from usn_offline.certify.graph import Graph


class Method(str, Enum):
    IBP = "ibp"
    CROWN = "crown"
    ALPHA_CROWN = "alpha-crown"


# Outward margin added to every bound, relative to (1 + |bound|): covers floating-point
# rounding of the bound computation itself (float64: errors ~1e-13 for these sizes).
DEFAULT_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass(frozen=True)
class PixelMap:
    """Network outputs (normalised x0, y0, x1, ...) -> pixels: px = scale * y + offset."""

    scale: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def for_image(cls, num_keypoints: int, height: int, width: int, dtype=torch.float64, device="cpu"
                  ) -> PixelMap:
        half = torch.tensor([width / 2.0, height / 2.0], dtype=dtype, device=device).repeat(num_keypoints)
        return cls(scale=half, offset=half - 0.5)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale + self.offset


def output_bounds(graph: Graph, images: torch.Tensor, boxes: Boxes, pixels: PixelMap,
                  method: Method | str = Method.CROWN, alpha_steps: int = 20,
                  margin: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds (B, 2K) of every keypoint coordinate in pixels, over each box."""
    method = Method(method)
    margin = DEFAULT_MARGIN.get(graph.dtype, 1e-4) if margin is None else margin
    linear = method is not Method.IBP
    with torch.no_grad():
        fwd = propagate(graph, images, boxes, linear=linear)
    if method is Method.IBP:
        lo, hi = pixels(fwd.out_lo), pixels(fwd.out_hi)
    else:
        eye = torch.diag(pixels.scale)
        rows = torch.cat([eye, -eye], dim=0)  # lower bounds of px and of -px
        if method is Method.CROWN:
            with torch.no_grad():
                bound = crown_lower(graph, fwd, images, boxes, rows)
        else:
            with torch.enable_grad():
                bound = alpha_crown_lower(graph, fwd, images, boxes, rows, steps=alpha_steps)
        k2 = pixels.scale.shape[0]
        lo = bound[:, :k2] + pixels.offset
        hi = -bound[:, k2:] + pixels.offset
        # Forward linear/interval bounds are sound too: keep the tighter of both.
        lo = torch.maximum(lo, pixels(fwd.out_lo))
        hi = torch.minimum(hi, pixels(fwd.out_hi))
    lo = lo - margin * (1 + lo.abs())
    hi = hi + margin * (1 + hi.abs())
    return lo.detach(), hi.detach()
