"""Backward (CROWN) passes for single neurons, restricted to their receptive fields.

Bounding a hidden neuron by a backward pass to the input is what makes CROWN tight, and
there are thousands of unstable neurons per layer. A dense pass carries, for every such
neuron, a coefficient tensor the size of each earlier feature map, almost all zeros: a
neuron of a convolutional layer only sees a small window of every earlier map. Here each
row carries just that window, (C, h, w) plus its offset in the map, and a convolution
steps back by a transposed convolution of the window (the window grows by the kernel, its
offset maps through stride and padding). Positions of a window outside the map are
padding: their coefficients are zeroed. Maps that are flat (after Flatten) are carried
whole. The result is the same linear bound in (a, b) as the dense pass, at a fraction of
the work (the "patches" mode of auto_LiRPA, here for a two-parameter input).

Every row belongs to one box (``box_index``), so the unstable neurons of each box get
their own rows and nothing is padded between boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usn_offline.certify.boxes import Boxes, linear_min
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.forward import ForwardBounds, relu_slopes
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
    extra_terms,
    input_terms,
)


@dataclass
class Window:
    """Coefficients of R rows on one node: (R, C, h, w) on a (C, H, W) map, where the
    rows of one group share a window at offsets (oy, ox) (per group, (G,)), or (R, N) on
    a flat node (oy = ox = None). The rows of a group are neurons of one position."""

    lam: torch.Tensor
    oy: torch.Tensor | None = None
    ox: torch.Tensor | None = None

    @property
    def flat(self) -> bool:
        return self.oy is None


def _positions(offset: torch.Tensor, size: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, size) map coordinates of a window and whether each lies inside [0, limit)."""
    pos = offset.unsqueeze(1) + torch.arange(size, device=offset.device)
    return pos.clamp(0, limit - 1), (pos >= 0) & (pos < limit)


def gather_window(maps: torch.Tensor, box_index: torch.Tensor, win: Window) -> torch.Tensor:
    """Values of per-box maps (B, C, H, W) under each group's window: (G, C, h, w), zero
    outside the map (``box_index``: each group's box).

    The maps are zero-padded as far as the windows reach beyond them, and every window is
    a view of the padded maps: indexing those views copies whole window rows into a
    (G, C, h, w) tensor in its own memory order (~1.7x faster than indexing every entry).
    """
    h, w = win.lam.shape[-2:]
    n, c, height, width = maps.shape
    top, left = max(0, -int(win.oy.min())), max(0, -int(win.ox.min()))
    bottom, right = max(0, int(win.oy.max()) + h - height), max(0, int(win.ox.max()) + w - width)
    padded = F.pad(maps, (left, right, top, bottom))
    s_box, s_c, s_y, s_x = padded.stride()
    windows = padded.as_strided((n, padded.shape[2] - h + 1, padded.shape[3] - w + 1, c, h, w),
                                (s_box, s_y, s_x, s_c, s_y, s_x))
    return windows[box_index, win.oy + top, win.ox + left]


def _inside(win: Window, shape: tuple[int, ...]) -> torch.Tensor:
    """(G, 1, h, w) mask of the window positions inside a (C, H, W) map."""
    h, w = win.lam.shape[-2:]
    _, vy = _positions(win.oy, h, shape[1])
    _, vx = _positions(win.ox, w, shape[2])
    return (vy[:, :, None] & vx[:, None, :])[:, None]


def _merge(first: Window, second: Window) -> Window:
    """Sum of two windows of the same rows on one node (residual branches)."""
    if first.flat != second.flat:
        raise CertificationError("residual branches reach one node as flat and as a feature map")
    if first.flat:
        return Window(first.lam + second.lam)
    dy, dx = second.oy - first.oy, second.ox - first.ox
    if (dy != dy[0]).any() or (dx != dx[0]).any():
        raise CertificationError("residual branches shift receptive fields unevenly")
    dy, dx = int(dy[0]), int(dx[0])
    h1, w1 = first.lam.shape[-2:]
    h2, w2 = second.lam.shape[-2:]
    top, left = min(0, dy), min(0, dx)
    bottom, right = max(h1, dy + h2), max(w1, dx + w2)
    a = F.pad(first.lam, (-left, right - w1, -top, bottom - h1))
    b = F.pad(second.lam, (dx - left, right - dx - w2, dy - top, bottom - dy - h2))
    return Window(a + b, first.oy + top, first.ox + left)


def _masked(win: Window, graph: Graph, node: int, row_group: torch.Tensor) -> Window:
    """The window with its positions outside the map zeroed: padding, not neurons. A
    ReLU's gathered relaxation is zero there already, so only other nodes need it."""
    if isinstance(graph.nodes[node].op, ReluOp):
        return win
    inside = _inside(win, graph.nodes[node].shape)
    return Window(win.lam * (inside if inside.shape[0] == 1 else inside[row_group]), win.oy, win.ox)


def _conv_transpose(lam: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """W^T lam over the whole window (no padding: the window keeps padding positions), as
    the convolution's input gradient: conv_transpose2d zero-fills an im2col buffer for the
    whole batch first (float64 on CPU, as in ops.Conv2dOp.transpose)."""
    r, _, h, w = lam.shape
    k_h, k_w = weight.shape[2:]
    size = (r, weight.shape[1], (h - 1) * stride[0] + k_h, (w - 1) * stride[1] + k_w)
    return torch.nn.grad.conv2d_input(size, weight, lam, stride)


def relaxation_maps(fwd: ForwardBounds, before: int | None = None) -> dict[int, torch.Tensor]:
    """Per ReLU (those before node ``before`` only, when given: all a backward pass from
    there reads), its relaxation as one (B, 3, *shape) tensor: lower slope, upper minus
    lower slope, upper intercept (so one gather serves all three)."""
    maps = {}
    for i, (lo, hi) in fwd.relu_input.items():
        if before is not None and i >= before:
            continue
        sl, su, iu, _ = relu_slopes(lo, hi)
        maps[i] = torch.stack([sl, su - sl, iu], dim=1)
    return maps


def backward_windows(graph: Graph, fwd: ForwardBounds, images: torch.Tensor, start: int,
                     start_window: Window, box_index: torch.Tensor, row_group: torch.Tensor,
                     relaxations: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Linear lower bounds in (a, b) of each row's combination of node ``start``: (R, 3 + E).

    The same computation as :func:`usn_offline.certify.crown.backward_linear` without a
    cut, one box per group of rows (``box_index``, (G,)); ``row_group`` (R,) names each
    row's group. A map's values under a window are gathered once per group.
    """
    dtype = graph.dtype
    relaxations = relaxation_maps(fwd) if relaxations is None else relaxations
    lam: list[Window | None] = [None] * len(graph.nodes)
    lam[start] = start_window
    r = start_window.lam.shape[0]
    coef = torch.zeros(r, 3 + len(extra_terms(images[:1], graph.input_shape[0])), dtype=dtype,
                       device=box_index.device)
    const = coef[:, 2]
    row_box = box_index[row_group]

    def under(maps: torch.Tensor, win: Window) -> torch.Tensor:
        """Per row, the per-box maps under its window (or the flat maps of its box)."""
        if win.flat:
            return maps[row_box]
        gathered = gather_window(maps, box_index, win)
        if gathered.shape[0] == 1:  # one window for all rows (a flat start): no copies
            return gathered.expand(r, *gathered.shape[1:])
        return gathered[row_group]

    def add_to(j: int, win: Window) -> None:
        lam[j] = win if lam[j] is None else _merge(lam[j], win)

    for i in range(start, -1, -1):
        win = lam[i]
        if win is None:
            continue
        lam[i] = None
        node = graph.nodes[i]
        op = node.op
        if isinstance(op, Conv2dOp):
            if op.bias is not None:
                const += win.lam.sum(dim=(2, 3)) @ op.bias
            back = _conv_transpose(win.lam, op.weight, op.stride)
            step = Window(back, win.oy * op.stride[0] - op.padding[0], win.ox * op.stride[1] - op.padding[1])
            add_to(node.inputs[0], _masked(step, graph, node.inputs[0], row_group))
        elif isinstance(op, AvgPool2dOp):
            back = F.conv_transpose2d(win.lam, op._w(win.lam), None, op.stride, groups=op.channels)
            step = Window(back, win.oy * op.stride[0], win.ox * op.stride[1])
            add_to(node.inputs[0], _masked(step, graph, node.inputs[0], row_group))
        elif isinstance(op, ChannelAffineOp):
            view = (1, -1) + (1,) * (win.lam.dim() - 2)
            const += (win.lam * op.shift.view(view)).flatten(1).sum(dim=1)
            add_to(node.inputs[0], Window(win.lam * op.scale.view(view), win.oy, win.ox))
        elif isinstance(op, LinearOp):
            if op.bias is not None:
                const += win.lam @ op.bias
            add_to(node.inputs[0], Window(win.lam @ op.weight))
        elif isinstance(op, FlattenOp):
            zero = torch.zeros(box_index.shape[0], dtype=torch.long, device=box_index.device)
            add_to(node.inputs[0], Window(win.lam.reshape(r, *op.in_shape), zero, zero))
        elif isinstance(op, AddOp):
            for c, j in zip(op.coeffs, node.inputs, strict=True):
                add_to(j, Window(c * win.lam, win.oy, win.ox))
        elif isinstance(op, ReluOp):
            maps = relaxations[i]
            relax = under(maps, win) if win.flat else under(maps.flatten(1, 2), win).unflatten(1, (3, -1))
            sl, gap, iu = relax.unbind(dim=1)
            # A negative coefficient takes the upper relaxation (slope sl + gap, intercept
            # iu), a positive one the lower: four passes over the window instead of seven.
            negative = win.lam.clamp(max=0.0)
            const += torch.linalg.vecdot(negative.flatten(1), iu.flatten(1))
            add_to(node.inputs[0], Window(torch.addcmul(win.lam * sl, negative, gap), win.oy, win.ox))
        elif isinstance(op, SemanticInputOp):
            # The gathered planes are zero outside the map, so m needs no mask there.
            planes = images[row_box] if win.flat else under(images, win)
            x, m, c_lo, c_hi = input_terms(planes, op.out_shape[0])
            lam_x = win.lam.view(x.shape)
            coef[:, 0] += (lam_x * x).flatten(1).sum(dim=1)
            if m is None:
                inside = 1.0 if win.flat else _inside(win, node.shape)[row_group]
                coef[:, 1] += (win.lam * inside).flatten(1).sum(dim=1)
            else:
                coef[:, 1] += (lam_x * m).flatten(1).sum(dim=1)
                const += (lam_x.clamp(min=0) * c_lo + lam_x.clamp(max=0) * c_hi).flatten(1).sum(dim=1)
                for k, plane in enumerate(extra_terms(planes, op.out_shape[0])):
                    coef[:, 3 + k] += (lam_x * plane).flatten(1).sum(dim=1)
        else:  # pragma: no cover - lowering only creates the ops above
            raise CertificationError(f"no backward step for {type(op).__name__}")
    return coef


def signed_neuron_bounds(graph: Graph, fwd: ForwardBounds, images: torch.Tensor, boxes: Boxes, node: int,
                         box_index: torch.Tensor, neuron: torch.Tensor, sign: torch.Tensor,
                         max_elements: int = 1 << 24, relaxations: dict[int, torch.Tensor] | None = None
                         ) -> torch.Tensor:
    """CROWN lower bounds of ``sign[k] * z[neuron[k]]`` over box ``box_index[k]``, z the flat
    values of ``node`` (sign +1: the neuron's lower bound; -1: minus its upper bound).
    ``relaxations``: :func:`relaxation_maps` of ``fwd``, when already made.

    The rows of one position of a feature map share one window (a group); rows go in
    chunks whose widest window stays below ``max_elements`` entries.
    """
    shape = graph.nodes[node].shape
    images = images.expand(len(boxes), *images.shape[1:]) if images.shape[0] == 1 else images
    relaxations = relaxation_maps(fwd, before=node) if relaxations is None else relaxations
    hw = 1 if len(shape) == 1 else shape[1] * shape[2]
    order = torch.argsort(box_index * hw + neuron % hw, stable=True)  # rows of a group side by side
    box_index, neuron, sign = box_index[order], neuron[order], sign[order]
    channel = neuron // hw
    chunk = max(1, max_elements // max(1, receptive_elements(graph, node)))
    bound = torch.empty(neuron.shape[0], dtype=graph.dtype, device=neuron.device)
    for start in range(0, neuron.shape[0], chunk):
        bidx, idx, ch, sg = (t[start:start + chunk] for t in (box_index, neuron, channel, sign))
        k = idx.shape[0]
        groups, row_group = torch.unique(bidx * hw + idx % hw, return_inverse=True)
        lam = torch.zeros(k, shape[0], dtype=graph.dtype, device=idx.device)
        lam[torch.arange(k, device=idx.device), ch] = sg
        if len(shape) == 1:
            win = Window(lam)
        else:
            pos = groups % hw
            win = Window(lam.view(k, shape[0], 1, 1), pos // shape[2], pos % shape[2])
        coef = backward_windows(graph, fwd, images, node, win, groups // hw, row_group, relaxations)
        bound[start:start + k] = linear_min(coef.unsqueeze(2), boxes.select(bidx))[:, 0]
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return bound[back]


def receptive_elements(graph: Graph, node: int) -> int:
    """The largest number of entries one row's window holds on its way back from ``node``
    (a cheap over-estimate from window growth through each layer)."""
    size: dict[int, tuple[int, int] | None] = {node: (1, 1) if len(graph.nodes[node].shape) == 3 else None}
    widest = 1
    for i in range(node, -1, -1):
        if i not in size:
            continue
        n = graph.nodes[i]
        hw = size[i]
        widest = max(widest, math.prod(n.shape) if hw is None else n.shape[0] * hw[0] * hw[1])
        op = n.op
        for j in n.inputs:
            in_shape = graph.nodes[j].shape
            if isinstance(op, (Conv2dOp, AvgPool2dOp)) and hw is not None:
                k = op.weight.shape[2:] if isinstance(op, Conv2dOp) else op.kernel
                new = tuple((hw[d] - 1) * op.stride[d] + k[d] for d in range(2))
            elif isinstance(op, FlattenOp):
                new = tuple(in_shape[1:])
            else:
                new = hw
            old = size.get(j)
            size[j] = new if old is None or new is None else (max(old[0], new[0]), max(old[1], new[1]))
    return widest
