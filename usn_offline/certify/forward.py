"""Forward bound propagation over a batch of (a, b) boxes: interval bounds (IBP) and
forward linear bounds (every neuron bounded by two linear functions of (a, b), DeepPoly /
forward-CROWN style). Because the perturbation has two parameters, a linear bound is
just three numbers per neuron, so forward linear propagation costs a few forward passes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from usn_offline.certify.boxes import Boxes, linear_max, linear_min
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.graph import Graph
from usn_offline.certify.ops import AddOp, AffineOp, ReluOp, SemanticInputOp, extra_terms, fan_in, input_terms


@dataclass
class ForwardBounds:
    """Interval bounds of every ReLU's input (for relaxations) and of the output; the
    output's linear bounds when linear propagation ran."""

    relu_input: dict[int, tuple[torch.Tensor, torch.Tensor]]
    out_lo: torch.Tensor
    out_hi: torch.Tensor
    out_lower: torch.Tensor | None = None
    out_upper: torch.Tensor | None = None
    kept_linear: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    states: dict[int, PassState] = field(default_factory=dict)

    def select(self, idx: torch.Tensor) -> ForwardBounds:
        """The bounds of a subset of the boxes."""
        pick = lambda pair: (pair[0][idx], pair[1][idx])  # noqa: E731
        return ForwardBounds(
            relu_input={k: pick(v) for k, v in self.relu_input.items()},
            out_lo=self.out_lo[idx], out_hi=self.out_hi[idx],
            out_lower=None if self.out_lower is None else self.out_lower[idx],
            out_upper=None if self.out_upper is None else self.out_upper[idx],
            kept_linear={k: pick(v) for k, v in (self.kept_linear or {}).items()})


@dataclass
class PassState:
    """A forward pass stopped just before node ``at``: everything the rest of it reads (the
    live bounds of earlier nodes, and what it has collected), so that it can be resumed
    there after bounds from elsewhere changed at ``at`` or later (``propagate(resume=)``)."""

    at: int
    lo: list
    hi: list
    low: list
    up: list
    remaining: list[int]
    relu_input: dict[int, tuple[torch.Tensor, torch.Tensor]]
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]]


def relu_slopes(lo: torch.Tensor, hi: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReLU relaxation on [lo, hi]: (lower slope, upper slope, upper intercept, unstable mask).

    Upper: the chord hi/(hi-lo) * (z - lo); lower: alpha * z with alpha = 1 when hi > -lo
    else 0 (the area-minimising choice); exact for stable neurons.
    """
    active = lo >= 0
    unstable = (lo < 0) & (hi > 0)
    denom = torch.where(unstable, hi - lo, torch.ones_like(lo))
    upper_slope = torch.where(active, torch.ones_like(lo),
                              torch.where(unstable, hi / denom, torch.zeros_like(lo)))
    upper_intercept = torch.where(unstable, -upper_slope * lo, torch.zeros_like(lo))
    lower_slope = torch.where(active, torch.ones_like(lo),
                              torch.where(unstable, (hi > -lo).to(lo.dtype), torch.zeros_like(lo)))
    return lower_slope, upper_slope, upper_intercept, unstable


def _batched(op: AffineOp, fn: torch.Tensor, use_abs: bool) -> torch.Tensor:
    b, k = fn.shape[:2]
    flat = fn.reshape(b * k, *fn.shape[2:])
    out = op.apply_abs(flat) if use_abs else op.apply(flat, bias=False)
    return out.reshape(b, k, *out.shape[1:])


def input_interval(images: torch.Tensor, boxes: Boxes, channels: int
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Interval bounds (B, C, H, W) of the network input z = a x + b m + c (+ extra terms)
    over each box, and its terms (x, m, c_lo, c_hi, extra planes), m and c filled in for a
    plain image."""
    # A plain image has x >= 0 (and m = 1), so the extremes of a*x + b sit at the
    # corners (a_lo, b_lo) and (a_hi, b_hi).
    x, m, c_lo, c_hi = input_terms(images, channels)
    v = (-1,) + (1,) * (images.dim() - 1)
    if m is None:
        lo = x * boxes.a_lo.view(v) + boxes.b_lo.view(v)
        hi = x * boxes.a_hi.view(v) + boxes.b_hi.view(v)
        m, c_lo = torch.ones_like(x), torch.zeros_like(x)
        c_hi = c_lo
    else:  # a pixel set: x may be signed (a standardised set), so both ends are compared
        xa_lo, xa_hi = x * boxes.a_lo.view(v), x * boxes.a_hi.view(v)
        mb_lo, mb_hi = m * boxes.b_lo.view(v), m * boxes.b_hi.view(v)
        lo = torch.minimum(xa_lo, xa_hi) + torch.minimum(mb_lo, mb_hi) + c_lo
        hi = torch.maximum(xa_lo, xa_hi) + torch.maximum(mb_lo, mb_hi) + c_hi
    extras = extra_terms(images, channels)
    if len(extras) != boxes.num_extra:
        raise CertificationError(f"the input set has {len(extras)} extra planes, its boxes "
                                 f"{boxes.num_extra} extra parameters")
    for k, plane in enumerate(extras):
        e_lo, e_hi = plane * boxes.extra_lo[:, k].view(v), plane * boxes.extra_hi[:, k].view(v)
        lo = lo + torch.minimum(e_lo, e_hi)
        hi = hi + torch.maximum(e_lo, e_hi)
    return lo, hi, (x, m, c_lo, c_hi, extras)


def rounding_error(graph: Graph, images: torch.Tensor, boxes: Boxes,
                   relu_input: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(B, *output shape): a bound on how far floating-point rounding can move each output
    of the network, over each box, as the bound computations meet it.

    Each affine layer computes sums of ``fan-in`` products, whose rounding is at most
    gamma(fan-in) = n u / (1 - n u) times the sum of their magnitudes (|W| |x| + |bias|,
    Higham's bound); that error travels on through |W| of the later layers, and stops at a
    ReLU that is off over the whole box. Magnitudes come from the sound interval bounds of
    every ReLU's input (``relu_input``, from :func:`propagate`), so they are those of the
    box, not of the weights alone. A relative margin on the output alone misses the case
    where large hidden values cancel into a small output (hidden ~5e9: 6e-6 px lost,
    certified with delta 1e-5 px while every point of the box broke it)."""
    u = torch.finfo(graph.dtype).eps / 2
    n = len(boxes)
    images = images.expand(n, *images.shape[1:]) if images.shape[0] == 1 else images
    # A bound on rounding need not be exact itself: computed in float32 (half the cost) it
    # is off by at most (layers x fan-in x 6e-8) relative, as all its terms are positive,
    # which the 1 % slack covers; the factor its user applies (bounds.ROUNDING_FACTOR) is
    # on top of that.
    approx = graph.astype(torch.float32)
    images = images.float()
    boxes = Boxes(*(None if t is None else t.float()
                    for t in (boxes.a_lo, boxes.a_hi, boxes.b_lo, boxes.b_hi, boxes.extra_lo, boxes.extra_hi)))
    relu_input = {r: (lo.float(), hi.float()) for r, (lo, hi) in relu_input.items()}
    graph, slack = approx, 1.01
    mag: list[torch.Tensor | None] = [None] * len(graph.nodes)
    err: list[torch.Tensor | None] = [None] * len(graph.nodes)
    remaining = [len(users) for users in graph.users]
    for i, node in enumerate(graph.nodes):
        op = node.op
        if isinstance(op, SemanticInputOp):
            lo, hi, _ = input_interval(images, boxes, op.out_shape[0])
            mag[i] = torch.maximum(lo.abs(), hi.abs())
            err[i] = 8 * u * mag[i]  # a x + b m + c and the extra terms: a few roundings each
        elif isinstance(op, AffineOp):
            j = node.inputs[0]
            reach = op.apply_abs(mag[j]) + graph.bias_map(i).abs()
            terms = fan_in(op) + 1
            mag[i] = reach
            err[i] = op.apply_abs(err[j]) + (terms * u / (1 - terms * u)) * reach
        elif isinstance(op, ReluOp):
            j = node.inputs[0]
            r_hi = relu_input[i][1] + err[j]  # where even the rounded value may be positive
            mag[i] = torch.minimum(mag[j], r_hi.clamp(min=0))
            err[i] = torch.where(r_hi > 0, err[j], torch.zeros_like(err[j]))
        elif isinstance(op, AddOp):
            mag[i] = sum(abs(c) * mag[j] for c, j in zip(op.coeffs, node.inputs, strict=True))
            err[i] = (sum(abs(c) * err[j] for c, j in zip(op.coeffs, node.inputs, strict=True))
                      + 2 * len(op.coeffs) * u * mag[i])
        for j in node.inputs:  # free what no later node reads
            remaining[j] -= 1
            if remaining[j] == 0 and j != graph.output:
                mag[j] = err[j] = None
    return err[graph.output].double() * slack


def propagate(graph: Graph, images: torch.Tensor, boxes: Boxes, linear: bool = True,
              intersect_ibp: bool = True, keep_linear: tuple[int, ...] = (),
              relu_bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
              save_at: Collection[int] = (), resume: PassState | None = None) -> ForwardBounds:
    """Propagate bounds for B boxes; ``images`` is (B, C, H, W) or (1, C, H, W).

    The forward linear bounds of the nodes in ``keep_linear`` are returned too, for a
    backward pass that stops there. ``relu_bounds`` holds tighter (sound) interval bounds
    of some ReLUs' inputs, computed elsewhere (backward passes): they are intersected with
    the forward ones before the ReLU is relaxed, so every later layer profits.

    The state of the pass just before each node of ``save_at`` is returned in ``states``;
    ``resume`` continues a pass from such a state (same graph, images, boxes and options),
    which gives what a pass from the start gives when nothing before ``resume.at`` changed.
    """
    if graph.standardise is not None:
        raise CertificationError("a graph that standardises its input is bounded through "
                                 "certify.standardise.standardised_sets on its body (output_bounds does this)")
    n = len(boxes)
    images = images.expand(n, *images.shape[1:]) if images.shape[0] == 1 else images
    if resume is None:
        lo: list[torch.Tensor | None] = [None] * len(graph.nodes)
        hi: list[torch.Tensor | None] = [None] * len(graph.nodes)
        low: list[torch.Tensor | None] = [None] * len(graph.nodes)
        up: list[torch.Tensor | None] = [None] * len(graph.nodes)
        remaining = [len(u) for u in graph.users]
        relu_input, kept, first = {}, {}, 0
    else:  # copies of the lists: the state stays valid for another resumption
        lo, hi, low, up = list(resume.lo), list(resume.hi), list(resume.low), list(resume.up)
        remaining, relu_input, kept = list(resume.remaining), dict(resume.relu_input), dict(resume.kept)
        first = resume.at
    states = {}

    for i in range(first, len(graph.nodes)):
        node, op = graph.nodes[i], graph.nodes[i].op
        if i in save_at:
            states[i] = PassState(i, list(lo), list(hi), list(low), list(up), list(remaining), dict(relu_input),
                                  dict(kept))
        if isinstance(op, SemanticInputOp):
            lo[i], hi[i], (x, m, c_lo, c_hi, extras) = input_interval(images, boxes, op.out_shape[0])
            if linear:
                low[i] = torch.stack([x, m, c_lo, *extras], dim=1)
                up[i] = torch.stack([x, m, c_hi, *extras], dim=1)
        elif isinstance(op, AffineOp):
            j = node.inputs[0]
            if not linear or intersect_ibp:
                mid, rad = (hi[j] + lo[j]) / 2, (hi[j] - lo[j]) / 2
                centre, spread = op.apply(mid), op.apply_abs(rad)
                lo[i], hi[i] = centre - spread, centre + spread
            if linear:
                fmid, frad = (up[j] + low[j]) / 2, (up[j] - low[j]) / 2
                wm, wr = _batched(op, fmid, False), _batched(op, frad, True)
                low[i], up[i] = wm - wr, wm + wr
                bias = graph.bias_map(i)
                low[i][:, 2] += bias
                up[i][:, 2] += bias
                lin_lo, lin_hi = linear_min(low[i], boxes), linear_max(up[i], boxes)
                if intersect_ibp:
                    lo[i], hi[i] = torch.maximum(lo[i], lin_lo), torch.minimum(hi[i], lin_hi)
                else:
                    lo[i], hi[i] = lin_lo, lin_hi
        elif isinstance(op, ReluOp):
            j = node.inputs[0]
            if relu_bounds is not None and i in relu_bounds:
                lo[j] = torch.maximum(lo[j], relu_bounds[i][0])
                hi[j] = torch.minimum(hi[j], relu_bounds[i][1])
            relu_input[i] = (lo[j], hi[j])
            lo[i], hi[i] = lo[j].clamp(min=0), hi[j].clamp(min=0)
            if linear:
                sl, su, iu, _ = relu_slopes(lo[j], hi[j])
                low[i] = low[j] * sl.unsqueeze(1)
                up[i] = up[j] * su.unsqueeze(1)
                up[i][:, 2] += iu
        elif isinstance(op, AddOp):
            parts_lo, parts_hi, parts_low, parts_up = [], [], [], []
            for c, j in zip(op.coeffs, node.inputs, strict=True):
                pos = c >= 0
                parts_lo.append(c * (lo[j] if pos else hi[j]))
                parts_hi.append(c * (hi[j] if pos else lo[j]))
                if linear:
                    parts_low.append(c * (low[j] if pos else up[j]))
                    parts_up.append(c * (up[j] if pos else low[j]))
            lo[i], hi[i] = sum(parts_lo), sum(parts_hi)
            if linear:
                low[i], up[i] = sum(parts_low), sum(parts_up)
        if linear and i in keep_linear:
            kept[i] = (low[i], up[i])
        for j in node.inputs:  # free what no later node reads
            remaining[j] -= 1
            if remaining[j] == 0 and j != graph.output:
                lo[j] = hi[j] = low[j] = up[j] = None

    o = graph.output
    return ForwardBounds(relu_input=relu_input, out_lo=lo[o], out_hi=hi[o], out_lower=low[o], out_upper=up[o],
                         kept_linear=kept, states=states)
