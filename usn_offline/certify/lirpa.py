"""The reference verifier, auto_LiRPA, as a second bounds backend and an oracle.

auto_LiRPA (BSD-3-Clause, an optional extra: ``pip install "auto_LiRPA @ git+<its
repository>"``) bounds the same lowered graph as our engine: the graph is rebuilt as a
torch module whose input is the two photometric parameters (a, b), through a Linear
layer with the image and ones as its two columns (its default "patches" convolution mode
then runs CROWN on CNN7-sized networks), then the clip and the network. It computes in
float32, so every bound is widened by a stated margin for rounding
(:data:`LIRPA_MARGIN`, relative to 1 + |bound|, in pixels): an empirical one, which holds
for hidden values up to ~1e5 and not beyond (an adversarial review found a network with
hidden values ~1e6 whose outputs left it by 3e-3 px); our own float64 bounds carry a
rounding bound that grows with the hidden values (:func:`~usn_offline.certify.forward.rounding_error`).
"""

from __future__ import annotations

import torch
from torch import nn

from usn_offline.certify.boxes import Boxes
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.graph import Graph
from usn_offline.certify.ops import (
    AddOp,
    AvgPool2dOp,
    ChannelAffineOp,
    Conv2dOp,
    FlattenOp,
    LinearOp,
    ReluOp,
    SemanticInputOp,
)

# Outward margin for auto_LiRPA's float32 bounds, relative to (1 + |bound|) in pixels.
LIRPA_MARGIN = 1e-4
LIRPA_METHODS = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "CROWN-Optimized"}


def lirpa_available() -> bool:
    try:
        import auto_LiRPA  # noqa: F401
    except ImportError:
        return False
    return True


def _with_parameters(module: nn.Module, op: Conv2dOp | LinearOp) -> nn.Module:
    """``module`` holding the op's weight and bias."""
    with torch.no_grad():
        module.weight.copy_(op.weight)
        if op.bias is not None:
            module.bias.copy_(op.bias)
    return module


class GraphModule(nn.Module):
    """A lowered graph as a float32 torch module of (a, b) for one image: the module
    auto_LiRPA bounds."""

    def __init__(self, graph: Graph, image: torch.Tensor) -> None:
        super().__init__()
        self.graph = graph
        shape = graph.input_shape
        pixels = image.detach().reshape(-1).to(torch.float32).cpu()
        self.photometric = nn.Linear(2, pixels.numel())
        with torch.no_grad():
            self.photometric.weight.copy_(torch.stack([pixels, torch.ones_like(pixels)], dim=1))
            self.photometric.bias.zero_()
        self.layers = nn.ModuleDict()
        self.uniform: dict[int, tuple[float, float]] = {}
        for i, node in enumerate(graph.nodes):
            op = node.op
            if isinstance(op, Conv2dOp):
                self.layers[str(i)] = _with_parameters(
                    nn.Conv2d(op.in_shape[0], op.out_shape[0], tuple(op.weight.shape[2:]), op.stride, op.padding,
                              bias=op.bias is not None), op)
            elif isinstance(op, LinearOp):
                self.layers[str(i)] = _with_parameters(
                    nn.Linear(op.in_shape[0], op.out_shape[0], bias=op.bias is not None), op)
            elif isinstance(op, AvgPool2dOp):
                self.layers[str(i)] = nn.AvgPool2d(op.kernel, op.stride)
            elif isinstance(op, ChannelAffineOp):
                if bool((op.scale == op.scale[0]).all()) and bool((op.shift == op.shift[0]).all()):
                    # Uniform over channels (the clip's shift): scalars, which auto_LiRPA
                    # broadcasts in any mode.
                    self.uniform[i] = (float(op.scale[0]), float(op.shift[0]))
                else:
                    view = (1, -1) + (1,) * (len(op.in_shape) - 1)
                    self.register_buffer(f"scale{i}", op.scale.detach().float().view(view))
                    self.register_buffer(f"shift{i}", op.shift.detach().float().view(view))
            elif not isinstance(op, (ReluOp, AddOp, FlattenOp, SemanticInputOp)):
                raise CertificationError(f"auto_LiRPA backend: no module for {type(op).__name__}")
        self.shape = tuple(shape)
        self.float()

    def forward(self, ab: torch.Tensor) -> torch.Tensor:
        values: list[torch.Tensor | None] = [None] * len(self.graph.nodes)
        for i, node in enumerate(self.graph.nodes):
            op = node.op
            if isinstance(op, SemanticInputOp):
                values[i] = self.photometric(ab).view(-1, *self.shape)
            elif isinstance(op, ChannelAffineOp):
                x = values[node.inputs[0]]
                if i in self.uniform:
                    s0, t0 = self.uniform[i]
                    values[i] = (x if s0 == 1.0 else x * s0) + t0
                else:
                    values[i] = x * getattr(self, f"scale{i}") + getattr(self, f"shift{i}")
            elif isinstance(op, ReluOp):
                values[i] = torch.relu(values[node.inputs[0]])
            elif isinstance(op, FlattenOp):
                values[i] = torch.flatten(values[node.inputs[0]], 1)
            elif isinstance(op, AddOp):
                # auto_LiRPA's patches mode multiplies only by 4-d constants: a sum or a
                # difference needs no multiplication.
                total = None
                for c, j in zip(op.coeffs, node.inputs, strict=True):
                    if abs(c) != 1.0:
                        raise CertificationError(f"auto_LiRPA backend: residual coefficient {c} (only +-1)")
                    if total is None:
                        total = values[j] if c > 0 else -values[j]
                    else:
                        total = total + values[j] if c > 0 else total - values[j]
                values[i] = total
            else:
                values[i] = self.layers[str(i)](values[node.inputs[0]])
        return values[self.graph.output]


def _float32_outward(values: torch.Tensor, down: bool) -> torch.Tensor:
    """``values`` in float32 on the CPU, rounded away from the box: to nearest would move a
    corner inwards half the time, and the box auto_LiRPA bounds would miss a sliver of ours."""
    rounded = values.float().cpu()
    back = rounded.double()
    target = values.detach().double().cpu()
    inward = back > target if down else back < target
    step = torch.full_like(rounded, -torch.inf if down else torch.inf)
    return torch.where(inward, torch.nextafter(rounded, step), rounded)


def lirpa_output_bounds(graph: Graph, image: torch.Tensor, boxes: Boxes, scale: torch.Tensor,
                        offset: torch.Tensor, method: str = "crown") -> tuple[torch.Tensor, torch.Tensor]:
    """auto_LiRPA's bounds (B, 2K) of every keypoint coordinate in pixels (px = scale * y +
    offset) over each box, widened by :data:`LIRPA_MARGIN`; float64 on the graph's device."""
    try:
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    except ImportError as exc:
        raise CertificationError("the auto_LiRPA backend needs auto_LiRPA installed "
                                 "(pip install 'auto_LiRPA @ git+https://github.com/Verified-Intelligence/auto_LiRPA')"
                                 ) from exc
    if image.shape[1] != graph.input_shape[0]:
        raise CertificationError("the auto_LiRPA backend bounds images, not pixel sets (per-frame proofs)")
    if method not in LIRPA_METHODS:
        raise CertificationError(f"auto_LiRPA backend: method must be one of {sorted(LIRPA_METHODS)}, got {method!r}")
    cache = graph.__dict__.setdefault("_lirpa_cache", {})
    key = image.detach().to(torch.float64).cpu()
    bounded = cache.get("module") if "image" in cache and torch.equal(cache["image"], key) else None
    lower_ab = _float32_outward(torch.stack([boxes.a_lo, boxes.b_lo], dim=1), down=True)
    upper_ab = _float32_outward(torch.stack([boxes.a_hi, boxes.b_hi], dim=1), down=False)
    centre = (lower_ab + upper_ab) / 2
    if bounded is None:
        bounded = BoundedModule(GraphModule(graph, key), centre, verbose=False)
        cache.clear()
        cache.update(image=key, module=bounded)
    x = BoundedTensor(centre, PerturbationLpNorm(norm=float("inf"), x_L=lower_ab, x_U=upper_ab))
    with torch.no_grad() if method != "alpha-crown" else torch.enable_grad():
        lo, hi = bounded.compute_bounds(x=(x,), method=LIRPA_METHODS[method])
    lo = lo.detach().to(graph.device, torch.float64) * scale + offset
    hi = hi.detach().to(graph.device, torch.float64) * scale + offset
    return lo - LIRPA_MARGIN * (1 + lo.abs()), hi + LIRPA_MARGIN * (1 + hi.abs())
