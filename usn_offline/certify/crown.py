"""Backward (CROWN) bound propagation of a linear specification, and alpha-CROWN.

For rows C (S x outputs), the backward pass computes for every box a linear function of
(a, b) that lower-bounds C y over the box, using the forward pass's interval bounds for
each ReLU's relaxation and choosing the relaxation per sign of the backward coefficient.
The perturbation layer z = a x + b is exactly linear, so the pass ends in (a, b) and is
minimised in closed form over each box. alpha-CROWN optimises the lower ReLU slopes
(any slope in [0, 1] is sound) by gradient ascent on the bound.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from usn_offline.certify.boxes import Boxes, linear_min
from usn_offline.certify.forward import ForwardBounds, PassState, propagate, relu_slopes
from usn_offline.certify.graph import Graph
from usn_offline.certify.ops import AddOp, AffineOp, ReluOp, SemanticInputOp, extra_terms, input_terms
from usn_offline.certify.patches import relaxation_maps, signed_neuron_bounds


def reached_backward(graph: Graph, start: int, cut: set[int]) -> set[int]:
    """Nodes a backward pass from ``start`` visits when it stops at the ``cut`` nodes."""
    seen, stack = set(), [start]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        if i not in cut:
            stack.extend(graph.nodes[i].inputs)
    return seen


def initial_alphas(graph: Graph, fwd: ForwardBounds, num_rows: int) -> dict[int, torch.Tensor]:
    """Heuristic lower slopes, one per (box, spec row, neuron) of every ReLU the backward
    pass crosses (those with unstable neurons only)."""
    alphas = {}
    reached = reached_backward(graph, graph.output, set(fwd.kept_linear or {}))
    for i, (lo, hi) in fwd.relu_input.items():
        if i not in reached or i in (fwd.kept_linear or {}) or not ((lo < 0) & (hi > 0)).any():
            continue
        sl, _, _, _ = relu_slopes(lo, hi)
        alphas[i] = sl.unsqueeze(1).expand(-1, num_rows, *sl.shape[1:]).clone()
    return alphas


def backward_linear(graph: Graph, fwd: ForwardBounds, images: torch.Tensor, rows: torch.Tensor,
                    alphas: dict[int, torch.Tensor] | None = None, start: int | None = None) -> torch.Tensor:
    """Linear lower bounds of ``rows @ v`` as functions of (a, b): shape (B, 3 + E, S), where v
    is the (flattened) value of node ``start`` (default: the output).

    ``rows`` is (S, numel) or (B, S, numel); images (B or 1, C, H, W).
    """
    start = graph.output if start is None else start
    some_relu = next(iter(fwd.relu_input.values()))[0]
    n = some_relu.shape[0]
    if rows.dim() == 2:
        rows = rows.unsqueeze(0).expand(n, *rows.shape)
    s = rows.shape[1]
    lam: list[torch.Tensor | None] = [None] * len(graph.nodes)
    lam[start] = rows.to(graph.dtype).reshape(n, s, *graph.nodes[start].shape)
    const = rows.new_zeros(n, s, dtype=graph.dtype)

    def add_to(j: int, value: torch.Tensor) -> None:
        lam[j] = value if lam[j] is None else lam[j] + value

    extras = len(extra_terms(images[:1], graph.input_shape[0]))
    coef = torch.zeros(n, s, 3 + extras, dtype=graph.dtype, device=rows.device)
    cut = fwd.kept_linear or {}
    for i in range(start, -1, -1):
        if lam[i] is None:
            continue
        node, l_i = graph.nodes[i], lam[i]
        lam[i] = None
        op = node.op
        if i in cut:
            # Stop here: bound lambda . v_i by the node's forward linear bounds in (a, b).
            low, up = cut[i]
            pos, neg = l_i.clamp(min=0).flatten(2), l_i.clamp(max=0).flatten(2)
            coef = coef + torch.einsum("bsn,bkn->bsk", pos, low.flatten(2))
            coef = coef + torch.einsum("bsn,bkn->bsk", neg, up.flatten(2))
        elif isinstance(op, AffineOp):
            flat = l_i.reshape(n * s, *node.shape)
            const = const + op.bias_dot(flat).view(n, s)
            add_to(node.inputs[0], op.transpose(flat).reshape(n, s, *graph.nodes[node.inputs[0]].shape))
        elif isinstance(op, AddOp):
            for c, j in zip(op.coeffs, node.inputs, strict=True):
                add_to(j, c * l_i)
        elif isinstance(op, ReluOp):
            lo, hi = fwd.relu_input[i]
            sl, su, iu, _ = relu_slopes(lo, hi)
            if alphas is not None and i in alphas:
                unstable = ((lo < 0) & (hi > 0)).unsqueeze(1)
                lower = torch.where(unstable, alphas[i], sl.unsqueeze(1))
            else:
                lower = sl.unsqueeze(1)
            pos, neg = l_i.clamp(min=0), l_i.clamp(max=0)
            const = const + (neg * iu.unsqueeze(1)).flatten(2).sum(dim=2)
            add_to(node.inputs[0], pos * lower + neg * su.unsqueeze(1))
        elif isinstance(op, SemanticInputOp):
            batch = images if images.shape[0] == n else images.expand(n, *images.shape[1:])
            x, m, c_lo, c_hi = input_terms(batch, op.out_shape[0])
            coef[:, :, 0] += (l_i * x.unsqueeze(1)).flatten(2).sum(dim=2)
            if m is None:
                coef[:, :, 1] += l_i.flatten(2).sum(dim=2)
            else:
                coef[:, :, 1] += (l_i * m.unsqueeze(1)).flatten(2).sum(dim=2)
                const = const + (l_i.clamp(min=0) * c_lo.unsqueeze(1) + l_i.clamp(max=0) * c_hi.unsqueeze(1)
                                 ).flatten(2).sum(dim=2)
                for k, plane in enumerate(extra_terms(batch, op.out_shape[0])):
                    coef[:, :, 3 + k] += (l_i * plane.unsqueeze(1)).flatten(2).sum(dim=2)
    coef[:, :, 2] += const
    return coef.transpose(1, 2)


def crown_lower(graph: Graph, fwd: ForwardBounds, images: torch.Tensor, boxes: Boxes,
                rows: torch.Tensor, alphas: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Lower bound of rows @ y over each box: (B, S)."""
    return linear_min(backward_linear(graph, fwd, images, rows, alphas), boxes)


def tighten_relu_inputs(graph: Graph, fwd: ForwardBounds, images: torch.Tensor, boxes: Boxes,
                        relus: list[int], max_rows: int = 512) -> None:
    """Replace the forward bounds of the given ReLUs' inputs by CROWN bounds where tighter
    (only for neurons the forward bounds leave unstable), in topological order so each
    ReLU's relaxation uses the already tightened earlier ones."""
    for r in sorted(relus):
        lo, hi = fwd.relu_input[r]
        j = graph.nodes[r].inputs[0]
        flat_lo, flat_hi = lo.flatten(1), hi.flatten(1)
        unstable = ((flat_lo < 0) & (flat_hi > 0)).any(dim=0).nonzero().flatten()
        if unstable.numel() == 0 or unstable.numel() > max_rows:
            continue
        numel = flat_lo.shape[1]
        eye = torch.zeros(unstable.numel(), numel, dtype=graph.dtype, device=lo.device)
        eye[torch.arange(unstable.numel()), unstable] = 1.0
        rows = torch.cat([eye, -eye], dim=0)
        bound = linear_min(backward_linear(graph, fwd, images, rows, start=j), boxes)
        k = unstable.numel()
        new_lo, new_hi = flat_lo.clone(), flat_hi.clone()
        new_lo[:, unstable] = torch.maximum(flat_lo[:, unstable], bound[:, :k])
        new_hi[:, unstable] = torch.minimum(flat_hi[:, unstable], -bound[:, k:])
        fwd.relu_input[r] = (new_lo.view_as(lo), new_hi.view_as(hi))


def relus_needing_backward(graph: Graph) -> list[int]:
    """The ReLUs whose input bounds a backward pass can tighten: those with a relaxed
    (non-clip) ReLU behind them. For the others (the clip layer, and the first network
    ReLU, one affine layer after it) forward linear bounds already equal CROWN's."""
    cached = graph.__dict__.get("_relus_needing_backward")
    if cached is not None:
        return cached
    clip = {i for i in graph.relu_indices if graph.nodes[i].name.startswith("clip.")}
    out = []
    for r in graph.relu_indices:
        if r in clip:
            continue
        behind = reached_backward(graph, graph.nodes[r].inputs[0], set())
        if any(isinstance(graph.nodes[k].op, ReluOp) and k not in clip for k in behind):
            out.append(r)
    graph.__dict__["_relus_needing_backward"] = out
    return out


def dense_signed_bounds(graph: Graph, fwd: ForwardBounds, images: torch.Tensor, boxes: Boxes, node: int,
                        box_index: torch.Tensor, neuron: torch.Tensor, sign: torch.Tensor,
                        max_elements: int = 1 << 24) -> torch.Tensor:
    """As :func:`usn_offline.certify.patches.signed_neuron_bounds`, by dense backward
    passes: for the neurons of a flat layer, whose receptive field is the whole image, the
    dense pass is about twice as fast (bench/certify_bench.py). Each box's rows are padded
    to the largest count with zero rows."""
    n, numel = len(boxes), graph.nodes[node].shape[0]
    counts = torch.bincount(box_index, minlength=n)
    slot = torch.arange(neuron.numel(), device=neuron.device) - (torch.cumsum(counts, 0) - counts)[box_index]
    s = int(counts.max())
    widest = max(math.prod(nd.shape) for nd in graph.nodes[:node + 1])
    chunk = max(1, max_elements // (n * widest))
    bound = torch.empty(neuron.numel(), dtype=graph.dtype, device=neuron.device)
    exact = ForwardBounds(relu_input=fwd.relu_input, out_lo=fwd.out_lo, out_hi=fwd.out_hi, kept_linear={})
    for start in range(0, s, chunk):
        pick = (slot >= start) & (slot < start + chunk)
        rows = torch.zeros(n, min(chunk, s - start), numel, dtype=graph.dtype, device=neuron.device)
        bi, sl = box_index[pick], slot[pick] - start
        rows[bi, sl, neuron[pick]] = sign[pick]
        bound[pick] = linear_min(backward_linear(graph, exact, images, rows, start=node), boxes)[bi, sl]
    return bound


def crown_intermediate(graph: Graph, images: torch.Tensor, boxes: Boxes, max_elements: int = 1 << 24,
                       one_side_first: bool = True, start: ForwardBounds | None = None,
                       prior: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> ForwardBounds:
    """Forward bounds whose ReLU input bounds are CROWN's: layer by layer, every neuron the
    bounds so far leave unstable gets a backward pass to the input (each box its own
    neurons, :func:`usn_offline.certify.patches.signed_neuron_bounds`), and the forward
    pass is redone with the tightened bounds so that the next layer starts from them
    (fewer unstable neurons to go back from). Every interval only ever shrinks: each
    forward pass is intersected with all earlier ones.

    A neuron's two bounds are two backward passes, and a neuron that one of them makes
    stable needs no other: its relaxation is exact (zero, or the identity) whatever the
    other bound. So each neuron first gets the bound on the side its interval leans to
    (the upper bound when hi < -lo), and the other only if it is still unstable: on the
    demo models most unstable neurons of the deeper layers settle in the first pass.
    ``one_side_first=False`` bounds both sides of every unstable neuron (the reference
    the tests compare with); the relaxations, and so the backward bounds, are the same.

    ``start``: a forward pass of these boxes already made (:func:`propagate` with
    ``save_at`` the ReLUs of :func:`relus_needing_backward`), which the first layer then
    starts from instead of a pass of its own. ``prior``: sound bounds of some ReLUs'
    inputs over each box, from elsewhere (a box that contains it), which every pass
    intersects with its own (``start`` already did).
    """
    relu_bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = dict(prior or {})
    needing = relus_needing_backward(graph)

    def forward(resume: PassState | None = None) -> ForwardBounds:
        # Only the layers from the tightened ReLU on change: the pass resumes there.
        later = [r for r in needing if resume is None or r > resume.at]
        fwd = propagate(graph, images, boxes, linear=True, intersect_ibp=True, relu_bounds=relu_bounds,
                        save_at=later, resume=resume)
        relu_bounds.update(fwd.relu_input)
        return fwd

    if start is not None and all(r in start.states for r in needing):
        fwd = start
        relu_bounds.update(start.relu_input)
    else:
        fwd = forward()
    for r in needing:
        lo, hi = fwd.relu_input[r]
        flat_lo, flat_hi = lo.flatten(1).clone(), hi.flatten(1).clone()
        if _tighten_unstable(graph, fwd, images, boxes, graph.nodes[r].inputs[0], flat_lo, flat_hi,
                             one_side_first, max_elements):
            relu_bounds[r] = (flat_lo.view_as(lo), flat_hi.view_as(hi))
            fwd = forward(fwd.states[r])
    # A new object (``start`` stays as it was), without the live tensors of every stop and
    # without a cut's linear bounds that ``start`` may have kept: backward passes from
    # these bounds go to the input.
    return replace(fwd, kept_linear={}, states={})


def _tighten_unstable(graph: Graph, fwd: ForwardBounds, images: torch.Tensor, boxes: Boxes, node: int,
                      flat_lo: torch.Tensor, flat_hi: torch.Tensor, one_side_first: bool,
                      max_elements: int) -> bool:
    """Tighten in place the (B, N) bounds of ``node``'s neurons that they leave unstable,
    by backward passes (:func:`crown_intermediate`); False when none is unstable."""
    box_index, neuron = ((flat_lo < 0) & (flat_hi > 0)).nonzero(as_tuple=True)
    if neuron.numel() == 0:
        return False
    flat = len(graph.nodes[node].shape) == 1
    relaxations = None if flat else relaxation_maps(fwd, before=node)  # both passes read them

    def tighten(pick: torch.Tensor, sign: torch.Tensor) -> None:
        """Bound sign * z of the entries ``pick``; keep the tighter of old and new."""
        bi, ne = box_index[pick], neuron[pick]
        if flat:
            bound = dense_signed_bounds(graph, fwd, images, boxes, node, bi, ne, sign, max_elements)
        else:
            bound = signed_neuron_bounds(graph, fwd, images, boxes, node, bi, ne, sign, max_elements, relaxations)
        lower, upper = sign > 0, sign < 0
        flat_lo[bi[lower], ne[lower]] = torch.maximum(flat_lo[bi[lower], ne[lower]], bound[lower])
        flat_hi[bi[upper], ne[upper]] = torch.minimum(flat_hi[bi[upper], ne[upper]], -bound[upper])

    everyone = torch.arange(neuron.numel(), device=neuron.device)
    if not one_side_first:
        tighten(torch.cat([everyone, everyone]),
                torch.cat([torch.ones_like(everyone), -torch.ones_like(everyone)]).to(graph.dtype))
        return True
    leans_low = flat_hi[box_index, neuron] < -flat_lo[box_index, neuron]
    first = torch.where(leans_low, -1.0, 1.0).to(graph.dtype)
    tighten(everyone, first)
    still = (flat_lo[box_index, neuron] < 0) & (flat_hi[box_index, neuron] > 0)
    if still.any():
        tighten(everyone[still], -first[still])
    return True


def alpha_crown_lower(graph: Graph, fwd: ForwardBounds, images: torch.Tensor, boxes: Boxes,
                      rows: torch.Tensor, steps: int = 20, lr: float = 0.2) -> torch.Tensor:
    """CROWN lower bound improved by optimising the ReLU lower slopes; never worse than CROWN
    (the best bound seen for each row is kept, and every iterate is sound)."""
    with torch.no_grad():
        best = crown_lower(graph, fwd, images, boxes, rows)
    alphas = initial_alphas(graph, fwd, rows.shape[-2])
    params = [a.requires_grad_(True) for a in alphas.values()]
    if not params or steps <= 0:
        return best
    optimiser = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        bound = crown_lower(graph, fwd, images, boxes, rows, alphas)
        best = torch.maximum(best, bound.detach())
        optimiser.zero_grad()
        (-bound.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(0.0, 1.0)
    with torch.no_grad():
        best = torch.maximum(best, crown_lower(graph, fwd, images, boxes, rows, alphas))
    return best
