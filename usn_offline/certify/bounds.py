"""Sound bounds on every keypoint coordinate (in pixels) over a batch of (a, b) boxes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import torch

from usn_offline.certify.boxes import Boxes
from usn_offline.certify.crown import (
    alpha_crown_lower,
    crown_intermediate,
    crown_lower,
    relus_needing_backward,
    tighten_relu_inputs,
)
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.forward import ForwardBounds, propagate, rounding_error
from usn_offline.certify.graph import Graph
from usn_offline.certify.lirpa import lirpa_output_bounds
from usn_offline.certify.standardise import bound_inputs
from usn_offline.runtime.preprocess import pixel_affine


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

    ``intermediate``: how the ReLU input bounds behind the relaxations are computed:
    "crown" by backward passes to the input for every unstable neuron, layer by layer
    (:func:`crown_intermediate`; the bounds of the reference verifier's CROWN), "forward"
    by forward linear propagation (cheaper, far looser once ReLUs become unstable),
    "auto" forward first, then CROWN for the boxes still unproven whose forward bounds
    leave at most ``crown_max_unstable`` unstable neurons (its cost grows with them) —
    except on a network with residual additions, where "auto" means "crown": forward
    bounds lose too much through the added paths (a pruned ResNet at +-3 %: forward leaves
    ~20,000 neurons unstable, CROWN ~6,500, so no box ever got CROWN and branch and bound
    took 87 boxes and 136 s on an image that CROWN proves in one box and 12 s).
    With "forward" or "auto": ``cut``, the node where the final backward pass switches to
    forward linear bounds ("auto": :meth:`Graph.default_cut`, None: go back to the
    input), and ``tighten_rows``: the deepest ReLU layer's unstable neurons get CROWN
    bounds when there are at most this many. ``max_elements`` caps the entries of each
    backward tensor (memory), by splitting the rows into chunks. ``backend``: "ours", or
    "auto_lirpa" to compute the same bounds with the reference verifier
    (:mod:`usn_offline.certify.lirpa`, float32 plus a stated margin; the other options
    do not apply to it).
    """

    intermediate: str = "auto"
    cut: int | str | None = "auto"
    tighten_rows: int = 0
    max_elements: int = 1 << 24
    crown_max_unstable: int = 3000
    backend: str = "ours"
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
        scale, offset = pixel_affine(height, width)  # the runtime's normalised_to_pixels, the same numbers
        return cls(scale=torch.tensor(scale, dtype=dtype, device=device).repeat(num_keypoints),
                   offset=torch.tensor(offset, dtype=dtype, device=device).repeat(num_keypoints))

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale + self.offset


# The bound computations (interval centre and radius, forward linear bounds, the backward
# pass's products) each round sums of the same sizes as the network itself; this many
# times the network's own rounding bound (forward.rounding_error) covers them.
ROUNDING_FACTOR = 4.0


def _with_margin(lo: torch.Tensor, hi: torch.Tensor, margin: float, rounding: torch.Tensor | float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return lo - margin * (1 + lo.abs()) - rounding, hi + margin * (1 + hi.abs()) + rounding


ReluBounds = dict[int, tuple[torch.Tensor, torch.Tensor]]


def output_bounds(graph: Graph, images: torch.Tensor, boxes: Boxes, pixels: PixelMap,
                  method: Method | str = Method.CROWN, options: BoundOptions = BoundOptions(),
                  done: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  prior: ReluBounds | None = None, learned: ReluBounds | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds (B, 2K) of every keypoint coordinate in pixels, over each box.

    ``done(lo, hi) -> (B,) bool``, when given, marks boxes whose cheaper forward bounds
    already suffice: the backward pass then only runs for the others.

    ``prior``: sound bounds (B, *shape) of some ReLUs' inputs over each box (a box's
    parent's in branch and bound: a sub-box lies inside it), intersected with the ones
    computed here. ``learned``, when given, receives the bounds of the inputs of the
    ReLUs of :func:`relus_needing_backward` over each box, the tightest this call found
    (for the boxes' sub-boxes, as their ``prior``). Both refer to the ReLUs of the graph
    that is bounded (its body, for a network that standardises its input); our engine only.
    """
    method = Method(method)
    if graph.standardise is not None:
        if options.backend != "ours":
            raise CertificationError("input standardisation is bounded by our engine only (--backend ours); "
                                     "auto_LiRPA has no relaxation of it")
        graph, images, boxes = bound_inputs(graph, images, boxes)
    if options.backend == "auto_lirpa":
        if images.shape[0] != 1:
            raise ValueError("the auto_LiRPA backend bounds boxes of one image at a time")
        return lirpa_output_bounds(graph, images, boxes, pixels.scale, pixels.offset, method.value)
    if options.backend != "ours":
        raise ValueError(f"bounds backend must be 'ours' or 'auto_lirpa', got {options.backend!r}")
    if images.shape[1] == graph.input_shape[0] and bool((images < 0).any()):
        # a x + b of a plain image is bounded at the box's corners, which holds for x >= 0.
        raise CertificationError("bounds over plain images need pixel values >= 0; give a signed input "
                                 "as a pixel set (x, 1, 0, 0)")
    if options.intermediate not in ("crown", "forward", "auto"):
        raise ValueError(f"intermediate bounds must be 'crown', 'forward' or 'auto', got {options.intermediate!r}")
    margin = DEFAULT_MARGIN.get(graph.dtype, 1e-4) if options.margin is None else options.margin
    if options.intermediate == "auto" and graph.has_residual:
        options = replace(options, intermediate="crown")
    cut = None if options.intermediate == "crown" else graph.default_cut() if options.cut == "auto" else options.cut
    # The pass stops are where CROWN intermediate bounds would resume it: that pass then
    # starts from this one.
    stops = relus_needing_backward(graph) if method is not Method.IBP and options.intermediate != "forward" else ()
    with torch.no_grad():
        # Intersecting with interval bounds at every layer costs ~10 % and makes the linear
        # methods never looser than IBP.
        fwd = propagate(graph, images, boxes, linear=method is not Method.IBP, intersect_ibp=True,
                        keep_linear=() if cut is None else (cut,), relu_bounds=prior, save_at=stops)
    if learned is not None:
        learned.update({r: fwd.relu_input[r] for r in relus_needing_backward(graph)})
    rounding: torch.Tensor | float = 0.0
    if graph.dtype == torch.float64:
        # float32 keeps its relative margin alone: its worst-case rounding bound is too wide
        # to prove anything (float32 bounds only screen boxes, or certify with --dtype
        # float32, whose margin docs/CERTIFICATION.md states as empirical).
        with torch.no_grad():
            rounding = ROUNDING_FACTOR * rounding_error(graph, images, boxes, fwd.relu_input) * pixels.scale.abs()
    lo, hi = _with_margin(pixels(fwd.out_lo), pixels(fwd.out_hi), margin, rounding)
    if method is Method.IBP:
        return lo, hi
    k2 = pixels.scale.shape[0]
    eye = torch.diag(pixels.scale)
    rows = torch.cat([eye, -eye], dim=0)  # lower bounds of px and of -px

    def open_boxes() -> torch.Tensor:
        return (torch.ones(len(boxes), dtype=torch.bool, device=lo.device) if done is None
                else ~done(lo, hi)).nonzero().flatten()

    def tighten(todo: torch.Tensor, crown: bool) -> None:
        """Backward bounds for the boxes ``todo``; keep the tighter of old and new."""
        sub_fwd: ForwardBounds = fwd.select(todo) if todo.numel() < len(boxes) else fwd
        sub_boxes = boxes.select(todo) if todo.numel() < len(boxes) else boxes
        sub_images = images if images.shape[0] == 1 else images[todo]
        with torch.no_grad():
            if crown:
                every = todo.numel() == len(boxes)
                sub_prior = None if prior is None or every else {r: (p[0][todo], p[1][todo])
                                                                  for r, p in prior.items()}
                sub_fwd = crown_intermediate(graph, sub_images, sub_boxes, options.max_elements,
                                             start=fwd if every else None, prior=sub_prior)
                for r, (r_lo, r_hi) in list((learned or {}).items()):
                    if every:
                        learned[r] = sub_fwd.relu_input[r]
                    else:
                        r_lo, r_hi = r_lo.clone(), r_hi.clone()
                        r_lo[todo], r_hi[todo] = sub_fwd.relu_input[r]
                        learned[r] = (r_lo, r_hi)
            else:
                deepest = graph.relu_indices[-1:]
                tighten_relu_inputs(graph, sub_fwd, sub_images, sub_boxes, deepest, options.tighten_rows)
            if method is Method.CROWN:
                bound = crown_lower(graph, sub_fwd, sub_images, sub_boxes, rows)
        if method is Method.ALPHA_CROWN:
            with torch.enable_grad():
                bound = alpha_crown_lower(graph, sub_fwd, sub_images, sub_boxes, rows, steps=options.alpha_steps)
        c_lo, c_hi = _with_margin(bound[:, :k2] + pixels.offset, -bound[:, k2:] + pixels.offset, margin,
                                  rounding if isinstance(rounding, float) else rounding[todo])
        # Forward and backward bounds are both sound: keep the tighter of each.
        lo[todo] = torch.maximum(lo[todo], c_lo.detach())
        hi[todo] = torch.minimum(hi[todo], c_hi.detach())

    todo = open_boxes()
    if todo.numel() and options.intermediate != "crown":
        tighten(todo, crown=False)
        todo = open_boxes()
    needing = relus_needing_backward(graph)
    if todo.numel() and needing and options.intermediate == "auto":
        # CROWN intermediate bounds cost about one backward pass per unstable neuron: only
        # where the forward bounds leave few enough (a budget in work, not time).
        unstable = sum(((fwd.relu_input[r][0] < 0) & (fwd.relu_input[r][1] > 0)).flatten(1).sum(dim=1)
                       for r in needing)
        todo = todo[unstable[todo] <= options.crown_max_unstable]
    if todo.numel() and needing and options.intermediate != "forward":
        tighten(todo, crown=True)
    return lo, hi
