"""Input-space branch and bound over (a, b) boxes.

Each root box is certified when every leaf of its split tree is verified by the bound
method, falsified when a concrete point violates the property, and left "unknown" when
the budget runs out. The budget counts work (splits along one path, bounded boxes), never
seconds, so the same inputs give the same outcome on an idle or a busy machine; the
``seconds`` of an outcome are a measurement only. Boxes of all roots are bounded together
in batches.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np
import torch

from usn_offline.certify.bounds import BoundOptions, Method, PixelMap, ReluBounds, output_bounds
from usn_offline.certify.boxes import Boxes, halves
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.falsify import deviations_at, pgd_attack
from usn_offline.certify.graph import Graph
from usn_offline.certify.spec import KeypointProperty
from usn_offline.perturb import PhotometricBox


class InputSets(Protocol):
    """An input set that depends on the box (a frame's pixel sets,
    :class:`~usn_offline.certify.frame.FramePixelSets`).

    A set may also be split in ways other than its (a, b) box: a *part* is an opaque
    refinement it hands out (:meth:`split`) and takes back (``parts``: one per box, None
    for the whole set over the box). Branch and bound only stores and passes parts."""

    def for_boxes(self, boxes: Boxes) -> torch.Tensor:
        """The set over each of a batch of boxes, (B, C, H, W) in the boxes' dtype."""

    def restrict(self, boxes: Boxes, parts: list | None = None) -> Boxes:
        """Each box shrunk to (a box around) its points the input can arise at; a box with
        no such point (in its part) comes back empty (a_lo > a_hi or b_lo > b_hi)."""

    def bound_inputs(self, graph: Graph, boxes: Boxes, parts: list | None = None
                     ) -> tuple[Graph, torch.Tensor, Boxes]:
        """(graph, inputs, boxes) that :func:`output_bounds` bounds the set over each box
        (and part) with: e.g. a standardising network's body over sets standardised with
        what the set knows of its dependence on (a, b)."""

    def split(self, graph: Graph, boxes: Boxes, parts: list | None, worst: torch.Tensor,
              halved: tuple[Boxes, Boxes]) -> list:
        """For each box (and part), two parts that together cover it, where splitting the
        set that way promises more for output coordinate ``worst`` (B,) than halving the
        box into ``halved``; else None (halve the box)."""


def _bounded(graph: Graph, sets: InputSets | None, image: torch.Tensor, boxes: Boxes, parts: list | None = None
             ) -> tuple[Graph, torch.Tensor, Boxes]:
    """What :func:`output_bounds` takes for ``boxes``: the image, or the sets over them."""
    return (graph, image, boxes) if sets is None else sets.bound_inputs(graph, boxes, parts)


class Status(str, Enum):
    CERTIFIED = "certified"
    FALSIFIED = "falsified"
    NOT_CERTIFIED = "not_certified"  # within the budget: neither proved nor falsified


@dataclass(frozen=True)
class BabConfig:
    """Bound method and budget of branch and bound (per call). The budget is counted in
    work (``max_depth``, ``max_boxes``), never in seconds: outcomes do not depend on machine
    load or speed."""

    method: Method = Method.CROWN
    max_depth: int = 10  # splits along one path from a root
    max_boxes: int = 512  # bounded boxes in total
    # Boxes bounded together; 0 = auto: 1 on the CPU, where the float64 bound computation is
    # memory-bound and larger batches cost more per box (measured: 60 ms/box at 1, 102 at 16),
    # 64 on CUDA.
    batch_size: int = 0
    attack_restarts: int = 6
    attack_steps: int = 8
    bounds: BoundOptions = field(default_factory=BoundOptions)
    # Screen sub-boxes with float32 bounds first: a box whose float32 bounds miss the
    # property by more than this many pixels is split without computing float64 bounds.
    # Only decisions to split are taken on float32 results; every "verified" comes from
    # float64 bounds, and every reported bound is a float64 bound. None disables it.
    screen_float32_px: float | None = 0.01
    # Input sets that can be split beyond their (a, b) box (:meth:`InputSets.split`) are
    # split so only in boxes whose bounds miss the property by at most this many deltas.
    # The set's choice is first-order, which holds once the bounds are near; far from it,
    # halving the box pays more. On the goal bag (16 boxes): frame 270 proves (1.97 px)
    # with a limit of 1, 2 or inf; with inf, frames 183, 185 and 194 end at 160, 18.9 and
    # 7.4 px instead of 92, 8.5 and 5.0 px (halving the box only).
    split_sets_within: float = 1.0

    def __post_init__(self) -> None:
        if self.max_depth < 0 or self.max_boxes < 1 or self.batch_size < 0:
            raise CertificationError("BaB budget: max_depth >= 0, max_boxes >= 1, batch_size >= 0 required")
        object.__setattr__(self, "method", Method(self.method))

    def batch_for(self, device: torch.device) -> int:
        """Boxes bounded together on ``device`` (``batch_size``, or its default there)."""
        return self.batch_size or (64 if device.type == "cuda" else 1)


@dataclass
class BoxOutcome:
    status: Status
    lower: np.ndarray  # (2K,) pixels: certified lower bound of each coordinate over the box
    upper: np.ndarray
    counterexample: tuple[float, float] | None = None
    counterexample_deviation: float | None = None
    boxes_bounded: int = 0
    depth: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # How the root was partitioned: sub-boxes proven, and sub-boxes left unresolved (budget,
    # depth, or the root was decided elsewhere). Together they cover the root, so a later
    # call on a part of the root only needs the unresolved ones (the radius search does this).
    certified_leaves: list[PhotometricBox] = field(default_factory=list)
    open_leaves: list[PhotometricBox] = field(default_factory=list)


@dataclass
class _Root:
    """Branch-and-bound state of one root box: its decision so far, the union of its leaves'
    bounds, and the leaves themselves (proven or left open), which together tile the box."""

    index: int
    box: PhotometricBox
    lower: torch.Tensor
    upper: torch.Tensor
    status: Status | None = None
    counterexample: tuple[float, float] | None = None
    counterexample_deviation: float | None = None
    bounded: int = 0
    depth: int = 0
    certified_leaves: list[PhotometricBox] = field(default_factory=list)
    open_leaves: list[PhotometricBox] = field(default_factory=list)

    def counted(self, depth: int) -> None:
        """One more box of this root bounded, ``depth`` splits below it."""
        self.bounded += 1
        self.depth = max(self.depth, depth)

    def empty(self, box: PhotometricBox) -> None:
        """A leaf where the input cannot arise: the property holds there vacuously."""
        self.certified_leaves.append(box)

    def leaf(self, box: PhotometricBox, lo: torch.Tensor, hi: torch.Tensor, proven: bool) -> None:
        """A leaf of the split tree, whose bounds ``lo``/``hi`` join the root's."""
        self.lower = torch.minimum(self.lower, lo)
        self.upper = torch.maximum(self.upper, hi)
        (self.certified_leaves if proven else self.open_leaves).append(box)

    def children(self, entry: _Entry, lo: torch.Tensor | None, hi: torch.Tensor | None,
                 relu: ReluBounds | None = None, parts: tuple | None = None) -> list[_Entry]:
        """The two halves of ``entry``'s box, across the side widest relative to the root's
        extent (both axes matter equally to the user), or, given ``parts``, its box with
        each of them; they inherit ``lo``/``hi``, the ReLU-input bounds ``relu`` and (for
        halves) the entry's part."""
        if parts is not None:
            return [_Entry(self, entry.box, entry.depth + 1, lo, hi, relu, part) for part in parts]
        return [_Entry(self, half, entry.depth + 1, lo, hi, relu, entry.part) for half in self.halves(entry.box)]

    def halves(self, box: PhotometricBox) -> tuple[PhotometricBox, PhotometricBox]:
        """``box`` halved across the side widest relative to the root's extent."""
        return halves(box, self.box.a_hi - self.box.a_lo, self.box.b_hi - self.box.b_lo)

    def outcome(self, seconds: float) -> BoxOutcome:
        return BoxOutcome(
            status=self.status or Status.CERTIFIED, lower=self.lower.cpu().numpy(), upper=self.upper.cpu().numpy(),
            counterexample=self.counterexample, counterexample_deviation=self.counterexample_deviation,
            boxes_bounded=self.bounded, depth=self.depth, seconds=seconds,
            certified_leaves=self.certified_leaves, open_leaves=self.open_leaves)


@dataclass
class _Entry:
    """A box waiting to be bounded, with the (float64) bounds inherited from its parent:
    of the output, and of the ReLU inputs (each (1, *shape), for the bounds of the box to
    start from; None for a root, or where they would take too much memory), and the part
    of the input set over the box (:class:`InputSets`; None: all of it)."""

    root: _Root
    box: PhotometricBox
    depth: int
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    relu: ReluBounds | None = None
    part: object = None


# Memory that the ReLU-input bounds inherited by the boxes waiting may take (a breadth-
# first queue of a large budget can hold thousands of boxes): beyond it, new boxes start
# without them, which costs time and tightness, never soundness. Counted in bytes of the
# tensors, so outcomes do not depend on the machine.
INHERITED_BOUNDS_BYTES = 256 << 20


def _inherited(prior: ReluBounds, i: int) -> ReluBounds:
    """Box ``i``'s ReLU-input bounds of a batch's, copied (a view would keep the batch's)."""
    return {r: (lo[i:i + 1].clone(), hi[i:i + 1].clone()) for r, (lo, hi) in prior.items()}


def _stacked(batch: list[_Entry]) -> ReluBounds | None:
    """The batch's inherited ReLU-input bounds as (B, *shape) tensors (-inf/inf where a box
    inherited none), or None when no box did."""
    known = [e.relu for e in batch if e.relu is not None]
    if not known:
        return None
    out = {}
    for r, (lo, hi) in known[0].items():
        out[r] = (torch.cat([e.relu[r][0] if e.relu is not None else torch.full_like(lo, -math.inf) for e in batch]),
                  torch.cat([e.relu[r][1] if e.relu is not None else torch.full_like(hi, math.inf) for e in batch]))
    return out


def _excess(prop: KeypointProperty, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(B,) how far (pixels) the bounds are from proving the property (<= 0: proved, L-inf view)."""
    r = prop.reference
    return torch.maximum(r - prop.delta - lo, hi - r - prop.delta).max(dim=1).values


def _screen(batch: list[_Entry], screen, config: BabConfig, sets: InputSets | None
            ) -> tuple[list[_Entry], list[_Entry]]:
    """Float32 screening: (the entries to bound in float64, the children of those whose
    float32 bounds clearly fail). Children keep the float64 bounds their parent inherited,
    which still cover them."""
    g32, image32, pixels32, prop32 = screen
    boxes = Boxes.from_boxes([e.box for e in batch], torch.float32, g32.device)
    lo, hi = output_bounds(*_bounded(g32, sets, image32, boxes, [e.part for e in batch]), pixels32,
                           config.method, config.bounds, done=prop32.verified)
    hopeless = _excess(prop32, lo, hi) > config.screen_float32_px
    keep, split = [], []
    for e, skip in zip(batch, hopeless.tolist(), strict=True):
        if skip and e.depth < config.max_depth:
            e.root.counted(e.depth)
            split += e.root.children(e, e.lo, e.hi, e.relu)
        else:
            keep.append(e)
    return keep, split


def _nonempty(boxes: Boxes) -> torch.Tensor:
    return (boxes.a_lo <= boxes.a_hi) & (boxes.b_lo <= boxes.b_hi)


def _restricted(batch: list[_Entry], sets: InputSets, dtype: torch.dtype, device) -> list[_Entry]:
    """The entries whose boxes the input can arise in, each box shrunk to where it can;
    the others become vacuously proven leaves of their roots."""
    shrunk = sets.restrict(Boxes.from_boxes([e.box for e in batch], dtype, device), [e.part for e in batch])
    keep = _nonempty(shrunk).tolist()
    rows = torch.stack([shrunk.a_lo, shrunk.a_hi, shrunk.b_lo, shrunk.b_hi], dim=1).tolist()
    kept = []
    for e, ok, row in zip(batch, keep, rows, strict=True):
        if ok:
            e.box = PhotometricBox(*row)
            kept.append(e)
        else:
            e.root.empty(e.box)
    return kept


def _set_splits(sets: InputSets | None, graph: Graph, boxes: Boxes, batch: list[_Entry], to_split: list[int],
                prop: KeypointProperty, lo: torch.Tensor, hi: torch.Tensor, within: float) -> list[tuple | None]:
    """For each entry ``to_split`` (indices into the batch), the two parts of its input
    set to split it into (:meth:`InputSets.split`), or None to halve its box. The set
    decides, for the output coordinate whose bounds miss the property most, and only for
    boxes whose bounds miss it by at most ``within`` times delta (:class:`BabConfig`)."""
    if sets is None or not to_split or not hasattr(sets, "split"):
        return [None] * len(to_split)
    idx = torch.tensor(to_split, device=lo.device)
    r = prop.reference
    excess, worst = torch.maximum(r - prop.delta - lo[idx], hi[idx] - r - prop.delta).max(dim=1)
    near = excess <= within * prop.delta
    if not bool(near.any()):
        return [None] * len(to_split)
    chosen = [i for i, ok in zip(to_split, near.tolist(), strict=True) if ok]
    idx, worst = idx[near], worst[near]
    halved = zip(*(batch[i].root.halves(batch[i].box) for i in chosen), strict=True)
    first, second = (Boxes.from_boxes(list(h), boxes.a_lo.dtype, boxes.a_lo.device) for h in halved)
    split = dict(zip(chosen, sets.split(graph, boxes.select(idx), [batch[i].part for i in chosen], worst,
                                        (first, second)), strict=True))
    return [split.get(i) for i in to_split]


def certify_boxes(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
                  roots: list[PhotometricBox], config: BabConfig = BabConfig(),
                  sets: InputSets | None = None) -> list[BoxOutcome]:
    """Certify the property on each root box for one image ((1, C, H, W), graph dtype).

    ``sets``: an input set that depends on the box (a frame's pixel sets, whose clipped
    pixels' intervals shrink with the box, and which arise only at some (a, b)). Every box
    is then first shrunk to where the input can arise (a box with no such point is a
    vacuously proven leaf) and bounded over its own set; point checks (box centres,
    attacks) use the set of that point alone, and count only where it can arise. ``image``
    (the set over the whole root) then only guides the attacks' search."""
    started = time.perf_counter()  # measured for the report; never decides anything
    dtype, device = graph.dtype, graph.device
    batch_size = config.batch_for(device)
    k2 = prop.reference.shape[0]
    states = [_Root(r, box, torch.full((k2,), float("inf"), dtype=dtype, device=device),
                    torch.full((k2,), -float("inf"), dtype=dtype, device=device)) for r, box in enumerate(roots)]

    fast = None  # float32 copies for work whose result is re-checked in float64 (CPU only)
    if dtype == torch.float64 and device.type == "cpu":
        fast = (graph.astype(torch.float32), image.float(), PixelMap(pixels.scale.float(), pixels.offset.float()),
                KeypointProperty(prop.reference.float(), prop.delta, prop.norm))

    # Each root is bounded first; the roots that bound does not prove are attacked before
    # any split, so a cheap counterexample still ends them at once, and provable roots
    # (most boxes of a radius search) never pay for an attack. The search may run in
    # float32; a counterexample counts only if it violates in float64.
    root_boxes = Boxes.from_boxes(roots, dtype, device)
    if sets is not None:
        root_boxes = sets.restrict(root_boxes)

    def at_points(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Deviations at concrete points; with ``sets``, over the set of each point (a real
        input), -inf where the input cannot arise."""
        if sets is None:
            return deviations_at(graph, image, prop, pixels, a, b)
        points = Boxes(a, a, b, b)
        inside = _nonempty(sets.restrict(points))
        dev = deviations_at(graph, sets.for_boxes(points), prop, pixels, a, b)
        return torch.where(inside, dev, torch.full_like(dev, -float("inf")))

    def attack(targets: list[_Root]) -> None:
        sub = root_boxes.select(torch.tensor([t.index for t in targets], device=device))
        if fast is not None:
            g32, image32, pixels32, prop32 = fast
            sub32 = Boxes(sub.a_lo.float(), sub.a_hi.float(), sub.b_lo.float(), sub.b_hi.float())
            a, b, _ = pgd_attack(g32, image32, prop32, pixels32, sub32, config.attack_restarts, config.attack_steps)
            a = torch.minimum(torch.maximum(a.double(), sub.a_lo), sub.a_hi)
            b = torch.minimum(torch.maximum(b.double(), sub.b_lo), sub.b_hi)
            dev = at_points(a, b)
        else:
            a, b, dev = pgd_attack(graph, image, prop, pixels, sub, config.attack_restarts, config.attack_steps)
            if sets is not None:
                dev = at_points(a, b)
        for k, target in enumerate(targets):
            if prop.violates(dev[k]):
                target.status = Status.FALSIFIED
                target.counterexample, target.counterexample_deviation = (float(a[k]), float(b[k])), float(dev[k])

    # The screen's float32 forward bounds would split boxes that CROWN intermediate bounds
    # prove: it only serves the forward setting.
    screen = fast if (config.screen_float32_px is not None and config.bounds.intermediate == "forward"
                      and config.bounds.backend == "ours") else None

    queue = deque(_Entry(state, state.box, 0, None, None) for state in states)
    total = 0
    first_pass = len(states)  # every root gets bounded at least once, whatever the budget
    while queue:
        if total >= config.max_boxes and first_pass <= 0:
            break
        batch: list[_Entry] = []
        while queue and len(batch) < batch_size:
            e = queue.popleft()
            if e.root.status is not None and e.lo is not None:
                e.root.leaf(e.box, e.lo, e.hi, proven=False)  # root already decided: keep its inherited bounds
                continue
            batch.append(e)
        if not batch:
            continue
        first_pass -= len(batch)
        if sets is not None:
            batch = _restricted(batch, sets, dtype, device)
            if not batch:
                continue
        if screen is not None and all(e.lo is not None for e in batch):
            kept, split = _screen(batch, screen, config, sets)
            queue.extend(split)
            total += len(batch) - len(kept)
            batch = kept
            if not batch:
                continue
        boxes = Boxes.from_boxes([e.box for e in batch], dtype, device)
        learned: ReluBounds = {}
        lo, hi = output_bounds(*_bounded(graph, sets, image, boxes, [e.part for e in batch]), pixels,
                               config.method, config.bounds, done=prop.verified, prior=_stacked(batch),
                               learned=learned)
        entry_bytes = sum(2 * t.element_size() * t[0].numel() for t, _ in learned.values())
        total += len(batch)
        for i, e in enumerate(batch):
            if e.lo is not None:  # a child lies inside its parent: both bounds hold
                lo[i], hi[i] = torch.maximum(lo[i], e.lo), torch.minimum(hi[i], e.hi)
        ok = prop.verified(lo, hi)
        unproven_roots = [e.root for i, e in enumerate(batch) if e.depth == 0 and not ok[i] and e.root.status is None]
        if unproven_roots:
            attack(unproven_roots)
        open_idx = [i for i, e in enumerate(batch) if not ok[i] and e.root.status is None]
        ma, mb = boxes.centres()
        dev = None
        if open_idx:
            idx = torch.tensor(open_idx, device=device)
            dev = at_points(ma[idx], mb[idx])
        to_split: list[int] = []
        for i, e in enumerate(batch):
            root = e.root
            root.counted(e.depth)
            if ok[i] or root.status is not None:
                root.leaf(e.box, lo[i], hi[i], proven=bool(ok[i]))
                continue
            d = dev[open_idx.index(i)]
            if prop.violates(d):
                root.status = Status.FALSIFIED
                root.counterexample, root.counterexample_deviation = (float(ma[i]), float(mb[i])), float(d)
                root.leaf(e.box, lo[i], hi[i], proven=False)
            elif e.depth >= config.max_depth:
                root.status = Status.NOT_CERTIFIED
                root.leaf(e.box, lo[i], hi[i], proven=False)
            else:
                to_split.append(i)
        parts = _set_splits(sets, graph, boxes, batch, to_split, prop, lo, hi, config.split_sets_within)
        for i, pair in zip(to_split, parts, strict=True):
            # A sub-box lies inside this box: the bounds of this box's ReLU inputs hold
            # there and start its own (fewer unstable neurons, tighter relaxations).
            keep = bool(learned) and (len(queue) + 2) * entry_bytes <= INHERITED_BOUNDS_BYTES
            queue.extend(batch[i].root.children(batch[i], lo[i].clone(), hi[i].clone(),
                                                _inherited(learned, i) if keep else None, pair))
    # Boxes left in the queue: their inherited bounds still cover their part of the root.
    for e in queue:
        if e.lo is not None:
            e.root.leaf(e.box, e.lo, e.hi, proven=False)
        else:
            e.root.open_leaves.append(e.box)
        if e.root.status is None:
            e.root.status = Status.NOT_CERTIFIED
    seconds = time.perf_counter() - started
    return [state.outcome(seconds / len(states)) for state in states]
