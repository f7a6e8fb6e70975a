"""Largest certified symmetric radius (frontier refinement or bisection) and certified-region maps."""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from usn_offline.certify.bab import BabConfig, Status, certify_boxes
from usn_offline.certify.bounds import PixelMap
from usn_offline.certify.boxes import halves, inside, intersect, ring
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.graph import Graph
from usn_offline.certify.spec import KeypointProperty
from usn_offline.perturb import PhotometricBox

STRATEGIES = ("frontier", "bisection")


@dataclass(frozen=True)
class RadiusConfig:
    """Symmetric boxes a in [1 - eps*contrast_scale, 1 + eps*contrast_scale],
    b in [-eps*brightness_scale, eps*brightness_scale]; eps searched in [0, eps_max].

    ``strategy``: "frontier" (default) refines the sub-box nearest to nominal that is not yet
    proven, within ``max_boxes`` bounded sub-boxes in all; "bisection" probes whole boxes
    (doubling eps from ``eps_start``, then ``steps`` bisections), each probe a branch and
    bound with the BabConfig's budget.
    """

    eps_max: float = 0.4
    steps: int = 4  # bisection steps after the growth phase
    eps_start: float = 0.0025
    contrast_scale: float = 1.0
    brightness_scale: float = 1.0
    strategy: str = "frontier"
    # frontier: sub-boxes bounded for the whole search; 0 = auto: 256 on the CPU (~8 s for
    # the demo model on 2 cores), 512 on CUDA (bounded 64 at a time: ~0.65 s on an H200)
    max_boxes: int = 0

    def __post_init__(self) -> None:
        if not self.eps_max > 0 or self.steps < 0 or not 0 < self.eps_start <= self.eps_max:
            raise CertificationError("radius search needs eps_max > 0, 0 < eps_start <= eps_max, steps >= 0")
        if self.contrast_scale < 0 or self.brightness_scale < 0:
            raise CertificationError("radius scales must be >= 0")
        if self.contrast_scale == 0 and self.brightness_scale == 0:
            raise CertificationError("radius scales cannot both be 0 (the box would not grow)")
        if self.eps_max * self.contrast_scale > 1:
            raise CertificationError("eps_max * contrast_scale must be <= 1 (contrast stays >= 0)")
        if self.strategy not in STRATEGIES:
            raise CertificationError(f"radius strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.max_boxes < 0:
            raise CertificationError(f"radius search budget must be >= 1 box (0: auto), got {self.max_boxes}")

    def box(self, eps: float) -> PhotometricBox:
        return PhotometricBox.symmetric(eps * self.contrast_scale, eps * self.brightness_scale)

    def budget(self, device: torch.device) -> int:
        """The frontier's box budget on ``device`` (``max_boxes``, or the default for it)."""
        return self.max_boxes or (512 if device.type == "cuda" else 256)

    def distance(self, box: PhotometricBox) -> float:
        """The smallest eps whose box(eps) meets ``box`` (inf if none does)."""
        da = max(0.0, box.a_lo - 1.0, 1.0 - box.a_hi)
        db = max(0.0, box.b_lo, -box.b_hi)
        return max(_scaled(da, self.contrast_scale), _scaled(db, self.brightness_scale))

    def eps_of(self, a: float, b: float) -> float:
        """The smallest eps whose box(eps) contains the point (a, b) (inf if none does)."""
        return max(_scaled(abs(a - 1.0), self.contrast_scale), _scaled(abs(b), self.brightness_scale))


def _scaled(gap: float, scale: float) -> float:
    if scale > 0:
        return gap / scale
    return 0.0 if gap == 0 else math.inf


@dataclass
class RadiusResult:
    certified_eps: float  # largest eps proven (0.0 with certified_at_zero False: nothing proven)
    certified_at_zero: bool
    falsified_eps: float | None  # smallest eps where a counterexample was found
    probes: list[tuple[float, str]]
    seconds: float
    boxes_bounded: int = 0


def largest_certified_radius(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
                             radius: RadiusConfig = RadiusConfig(), bab: BabConfig = BabConfig()
                             ) -> RadiusResult:
    """The largest eps for which the property is proven on all of ``radius.box(eps)``."""
    if radius.strategy == "frontier":
        return _frontier_radius(graph, image, prop, pixels, radius, bab)
    return _bisection_radius(graph, image, prop, pixels, radius, bab)


def _frontier_radius(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
                     radius: RadiusConfig, bab: BabConfig) -> RadiusResult:
    """Best-first refinement of a tiling of box(eps_max).

    The tiling starts as box(eps_start) and rings out to eps_max, eps doubling (the boxes
    a bisection's growth phase would probe). Every tile not yet proven waits in a queue
    ordered by its distance to nominal (the smallest eps whose box meets it); the nearest
    ones are bounded, and a tile that fails is split in two and goes back. Proven tiles
    leave the queue, and the tiles cover box(eps_max), so box(eps) for every eps up to the
    nearest waiting tile's distance lies in the union of proven (closed) tiles: that
    distance is the certified radius. Every bounded box therefore works on the current
    limit of the radius, where bisection spends whole branch-and-bound budgets on probes
    that fail. Ends when the queue is empty (radius eps_max), at the box budget
    (``radius.budget``; work, never seconds, so the radius does not depend on machine load),
    when the nearest tile is as small as box(eps_start) after ``bab.max_depth`` splits (the
    outer tiles start larger, so a depth count would stop them coarser), or when the
    nearest tile lies beyond a counterexample.
    """
    started = time.perf_counter()  # measured for the report; never decides anything
    probes: list[tuple[float, str]] = []
    nominal = certify_boxes(graph, image, prop, pixels, [radius.box(0.0)], bab)[0]
    probes.append((0.0, nominal.status.value))
    if nominal.status is not Status.CERTIFIED:
        return RadiusResult(0.0, False, 0.0, probes, time.perf_counter() - started, nominal.boxes_bounded)

    edges = [radius.eps_start]
    while edges[-1] < radius.eps_max:
        edges.append(min(2 * edges[-1], radius.eps_max))
    tiles = [radius.box(edges[0])]
    for inner, outer in itertools.pairwise(edges):
        tiles += ring(radius.box(inner), radius.box(outer))
    order = itertools.count()  # ties: larger (less likely provable) tiles first, then FIFO

    def entry(box: PhotometricBox) -> tuple:
        area = (box.a_hi - box.a_lo) * (box.b_hi - box.b_lo)
        return radius.distance(box), -area, next(order), box

    smallest = 2 * radius.eps_start * 2.0 ** (-bab.max_depth / 2)  # longest side, eps units
    queue = [entry(t) for t in tiles]
    heapq.heapify(queue)
    # Each tile is bounded once per call (no splitting inside); corners and centre are
    # still evaluated for counterexamples.
    once = replace(bab, max_boxes=1, attack_restarts=0, attack_steps=0)
    batch = bab.batch_for(graph.device)
    budget = radius.budget(graph.device)
    falsified = math.inf  # eps of the nearest counterexample found
    blocked = math.inf  # distance of the nearest tile that may not be split again
    bounded = 0

    def limit() -> float:
        return min(falsified, blocked)

    while queue and queue[0][0] < limit() and bounded < budget:
        # A batch (CUDA) takes the nearest tiles, but none more than half as far again as
        # the nearest: farther ones would spend the budget before the radius gets there.
        take = [heapq.heappop(queue)]
        reach = take[0][0] * 1.5 + 1e-12
        while queue and len(take) < min(batch, budget - bounded) and queue[0][0] < min(limit(), reach):
            take.append(heapq.heappop(queue))
        outcomes = certify_boxes(graph, image, prop, pixels, [t[3] for t in take], once)
        bounded += len(take)
        for (distance, _, _, box), out in zip(take, outcomes, strict=True):
            if out.status is Status.CERTIFIED:
                continue
            if out.status is Status.FALSIFIED:
                falsified = min(falsified, radius.eps_of(*out.counterexample))
            if _longest_side(box, radius) <= smallest:
                blocked = min(blocked, distance)
            else:
                for child in halves(box, radius.contrast_scale, radius.brightness_scale):
                    heapq.heappush(queue, entry(child))
    # Unproven: the tiles still queued, the blocked ones, and (beyond the falsified eps) the
    # tile holding the counterexample, whose children are queued at most that far out.
    nearest = min(queue[0][0] if queue else math.inf, blocked)
    # The distances are float quotients: step back by far more than their rounding so that
    # box(certified), built from rounded products again, cannot reach past them. With
    # everything proven, the tiles are box(eps_max) itself.
    certified = max(0.0, nearest * (1 - 1e-9) - 1e-12) if nearest < radius.eps_max else radius.eps_max
    probes.append((certified, Status.CERTIFIED.value))
    return RadiusResult(certified, True, None if falsified == math.inf else falsified, probes,
                        time.perf_counter() - started, nominal.boxes_bounded + bounded)


def _sides(box: PhotometricBox, radius: RadiusConfig) -> tuple[float, float]:
    """Side lengths in eps units (a degenerate side: 0)."""
    wa = _scaled(box.a_hi - box.a_lo, radius.contrast_scale) if box.a_hi > box.a_lo else 0.0
    wb = _scaled(box.b_hi - box.b_lo, radius.brightness_scale) if box.b_hi > box.b_lo else 0.0
    return wa, wb


def _longest_side(box: PhotometricBox, radius: RadiusConfig) -> float:
    return max(_sides(box, radius))


def _bisection_radius(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
                      radius: RadiusConfig, bab: BabConfig) -> RadiusResult:
    """Grow eps geometrically from ``eps_start`` (x2) until a box fails, then bisect.

    Certified boxes are nested, so proving eps proves every smaller one; starting small
    keeps the budget on boxes that have a chance (large boxes of a naturally trained
    network need many splits).
    """
    probes: list[tuple[float, str]] = []
    seconds = 0.0
    proven = -1.0  # largest eps certified so far (-1: not even eps = 0)
    # Unresolved sub-boxes of the last probe that ended without a proof or counterexample.
    # With the proven box and that probe's certified sub-boxes they cover box(hi), so a
    # later probe at eps < hi only has to prove them clipped to box(eps): branch and bound
    # continues where the failed probe stopped instead of starting over.
    pending: list[PhotometricBox] | None = None

    def probe(eps: float) -> Status:
        nonlocal seconds, pending
        outer = radius.box(eps)
        config = bab
        if pending is not None:
            inner = radius.box(proven)
            roots = [c for c in (intersect(leaf, outer) for leaf in pending)
                     if c is not None and not inside(c, inner)]
            # The failed probe's attack already searched these boxes; corners and centres
            # (still evaluated) are enough here.
            config = replace(bab, attack_restarts=0, attack_steps=0)
        else:  # only the ring between the proven box and box(eps) still needs a proof
            roots = ring(radius.box(proven), outer) if proven >= 0 else [outer]
        outs = certify_boxes(graph, image, prop, pixels, roots, config) if roots else []
        statuses = {o.status for o in outs}
        status = (Status.FALSIFIED if Status.FALSIFIED in statuses else
                  Status.NOT_CERTIFIED if Status.NOT_CERTIFIED in statuses else Status.CERTIFIED)
        if status is Status.NOT_CERTIFIED:
            pending = [leaf for o in outs for leaf in o.open_leaves]
        elif status is Status.FALSIFIED:
            pending = None  # the falsified root's leaves are not tracked; start over
        probes.append((eps, status.value))
        seconds += sum(o.seconds for o in outs)
        return status

    if probe(0.0) is not Status.CERTIFIED:
        return RadiusResult(0.0, False, 0.0, probes, seconds)
    proven = 0.0
    lo, hi, falsified = 0.0, None, None
    eps = radius.eps_start
    while hi is None:
        status = probe(eps)
        if status is Status.CERTIFIED:
            lo = proven = eps
            if eps >= radius.eps_max:
                return RadiusResult(lo, True, None, probes, seconds)
            eps = min(2 * eps, radius.eps_max)
        else:
            hi = eps
            if status is Status.FALSIFIED:
                falsified = eps
    for _ in range(radius.steps):
        mid = (lo + hi) / 2
        status = probe(mid)
        if status is Status.CERTIFIED:
            lo = proven = mid
        else:
            hi = mid
            if status is Status.FALSIFIED:
                falsified = mid
    return RadiusResult(lo, True, falsified, probes, seconds)


@dataclass
class RegionMap:
    """Status of each (a, b) cell of a grid over a box: status[i, j] for a-cell i, b-cell j."""

    a_edges: np.ndarray
    b_edges: np.ndarray
    status: np.ndarray  # (na, nb) of Status values as strings


def region_edges(box: PhotometricBox, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The a and b cell edges of a ``grid`` (na, nb) over ``box``."""
    na, nb = grid
    if na < 1 or nb < 1:
        raise CertificationError(f"region grid must be at least 1x1, got {na}x{nb}")
    return np.linspace(box.a_lo, box.a_hi, na + 1), np.linspace(box.b_lo, box.b_hi, nb + 1)


def region_map(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
               box: PhotometricBox, grid: tuple[int, int], bab: BabConfig = BabConfig()) -> RegionMap:
    na, nb = grid
    a_edges, b_edges = region_edges(box, grid)
    cells = [PhotometricBox(a_edges[i], a_edges[i + 1], b_edges[j], b_edges[j + 1])
             for i in range(na) for j in range(nb)]
    outcomes = certify_boxes(graph, image, prop, pixels, cells, bab)
    status = np.array([o.status.value for o in outcomes], dtype=object).reshape(na, nb)
    return RegionMap(a_edges, b_edges, status)
