"""Sound bounds on every keypoint coordinate (in pixels) over a batch of (a, b) boxes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from usn_offline.certify.boxes import Boxes
from usn_offline.certify.crown import alpha_crown_lower, crown_lower, tighten_relu_inputs
from usn_offline.certify.forward import ForwardBounds, propagate
from usn_offline.certify.graph import Graph


class Method(str, Enum):
    IBP = "ibp"
    CROWN = "crown"
    ALPHA_CROWN = "alpha-crown"


# Outward margin added to every bound, relative to (1 + |bound|): covers floating-point
# rounding of the bound computation itself (float64: errors ~1e-13 for these sizes).
DEFAULT_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass(frozen=True)
class BoundOptions:
    """Trade-offs of the linear methods.

    ``cut``: node where the backward pass switches to forward linear bounds ("auto":
    :meth:`Graph.default_cut`, None: go back to the input). ``tighten_rows``: the deepest
    ReLU layer's unstable neurons get CROWN bounds when there are at most this many.
    """

    cut: int | str | None = "auto"
    tighten_rows: int = 0
    alpha_steps: int = 20
    margin: float | None = None


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


def _with_margin(lo: torch.Tensor, hi: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    return lo - margin * (1 + lo.abs()), hi + margin * (1 + hi.abs())


def output_bounds(graph: Graph, images: torch.Tensor, boxes: Boxes, pixels: PixelMap,
                  method: Method | str = Method.CROWN, options: BoundOptions = BoundOptions(),
                  done: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds (B, 2K) of every keypoint coordinate in pixels, over each box.

    ``done(lo, hi) -> (B,) bool``, when given, marks boxes whose cheaper forward bounds
    already suffice: the backward pass then only runs for the others.
    """
    method = Method(method)
    margin = DEFAULT_MARGIN.get(graph.dtype, 1e-4) if options.margin is None else options.margin
    cut = graph.default_cut() if options.cut == "auto" else options.cut
    with torch.no_grad():
        # Intersecting with interval bounds at every layer costs ~10 % and makes the linear
        # methods never looser than IBP.
        fwd = propagate(graph, images, boxes, linear=method is not Method.IBP,
                        intersect_ibp=True, keep_linear=() if cut is None else (cut,))
    lo, hi = _with_margin(pixels(fwd.out_lo), pixels(fwd.out_hi), margin)
    if method is Method.IBP:
        return lo, hi
    todo = torch.arange(len(boxes), device=lo.device)
    if done is not None:
        todo = (~done(lo, hi)).nonzero().flatten()
    if todo.numel() == 0:
        return lo, hi
    sub_fwd: ForwardBounds = fwd.select(todo) if todo.numel() < len(boxes) else fwd
    sub_boxes = boxes.select(todo) if todo.numel() < len(boxes) else boxes
    sub_images = images if images.shape[0] == 1 else images[todo]
    eye = torch.diag(pixels.scale)
    rows = torch.cat([eye, -eye], dim=0)  # lower bounds of px and of -px
    with torch.no_grad():
        deepest = graph.relu_indices[-1:]
        tighten_relu_inputs(graph, sub_fwd, sub_images, sub_boxes, deepest, options.tighten_rows)
        if method is Method.CROWN:
            bound = crown_lower(graph, sub_fwd, sub_images, sub_boxes, rows)
    if method is Method.ALPHA_CROWN:
        with torch.enable_grad():
            bound = alpha_crown_lower(graph, sub_fwd, sub_images, sub_boxes, rows, steps=options.alpha_steps)
    k2 = pixels.scale.shape[0]
    c_lo, c_hi = _with_margin(bound[:, :k2] + pixels.offset, -bound[:, k2:] + pixels.offset, margin)
    # Forward and backward bounds are both sound: keep the tighter of each.
    lo, hi = lo.clone(), hi.clone()
    lo[todo] = torch.maximum(lo[todo], c_lo.detach())
    hi[todo] = torch.minimum(hi[todo], c_hi.detach())
    return lo, hi
