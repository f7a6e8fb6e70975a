"""Largest certified symmetric radius (bisection) and certified-region maps."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from usn_offline.certify.bab import BabConfig, Status, certify_boxes
from usn_offline.certify.bounds import PixelMap
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.graph import Graph
from usn_offline.certify.spec import KeypointProperty
from usn_offline.perturb import PhotometricBox


@dataclass(frozen=True)
class RadiusConfig:
    """Symmetric boxes a in [1 - eps*contrast_scale, 1 + eps*contrast_scale],
    b in [-eps*brightness_scale, eps*brightness_scale]; eps searched in [0, eps_max]."""

    eps_max: float = 0.4
    steps: int = 4  # bisection steps after the growth phase
    eps_start: float = 0.0025
    contrast_scale: float = 1.0
    brightness_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.eps_max > 0 or self.steps < 0 or not 0 < self.eps_start <= self.eps_max:
            raise CertificationError("radius search needs eps_max > 0, 0 < eps_start <= eps_max, steps >= 0")
        if self.contrast_scale < 0 or self.brightness_scale < 0:
            raise CertificationError("radius scales must be >= 0")
        if self.eps_max * self.contrast_scale > 1:
            raise CertificationError("eps_max * contrast_scale must be <= 1 (contrast stays >= 0)")

    def box(self, eps: float) -> PhotometricBox:
        return PhotometricBox.symmetric(eps * self.contrast_scale, eps * self.brightness_scale)


@dataclass
class RadiusResult:
    certified_eps: float  # largest eps proven (0.0 with certified_at_zero False: nothing proven)
    certified_at_zero: bool
    falsified_eps: float | None  # smallest eps where a counterexample was found
    probes: list[tuple[float, str]]
    seconds: float


def largest_certified_radius(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
                             radius: RadiusConfig = RadiusConfig(), bab: BabConfig = BabConfig()
                             ) -> RadiusResult:
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
            roots = [c for c in (_clip(leaf, outer) for leaf in pending)
                     if c is not None and not _inside(c, inner)]
            # The failed probe's attack already searched these boxes; corners and centres
            # (still evaluated) are enough here.
            config = replace(bab, attack_restarts=0, attack_steps=0)
        else:  # only the ring between the proven box and box(eps) still needs a proof
            roots = ring(radius.box(proven), outer) if proven >= 0 else [outer]
        outs = certify_boxes(graph, image, prop, pixels, roots, config) if roots else []
        statuses = {o.status for o in outs}
        status = (Status.FALSIFIED if Status.FALSIFIED in statuses else
                  Status.UNKNOWN if Status.UNKNOWN in statuses else Status.CERTIFIED)
        if status is Status.UNKNOWN:
            pending = [PhotometricBox(*leaf) for o in outs for leaf in o.open_leaves]
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


def _clip(box: PhotometricBox, to: PhotometricBox) -> PhotometricBox | None:
    """The intersection of two boxes; None when it is empty, or when it is thinner than
    ``to`` in a side where ``to`` has extent (a segment on a shared edge: the network is
    continuous and the property closed, so it holds there once it holds on both sides)."""
    a_lo, a_hi = max(box.a_lo, to.a_lo), min(box.a_hi, to.a_hi)
    b_lo, b_hi = max(box.b_lo, to.b_lo), min(box.b_hi, to.b_hi)
    if a_lo > a_hi or b_lo > b_hi:
        return None
    if (a_lo == a_hi and to.a_lo < to.a_hi) or (b_lo == b_hi and to.b_lo < to.b_hi):
        return None
    return PhotometricBox(a_lo, a_hi, b_lo, b_hi)


def _inside(box: PhotometricBox, outer: PhotometricBox) -> bool:
    return outer.a_lo <= box.a_lo and box.a_hi <= outer.a_hi and outer.b_lo <= box.b_lo and box.b_hi <= outer.b_hi


def ring(inner: PhotometricBox, outer: PhotometricBox) -> list[PhotometricBox]:
    """Boxes covering ``outer`` minus the interior of ``inner`` (inner inside outer)."""
    parts = []
    if outer.a_lo < inner.a_lo:
        parts.append(PhotometricBox(outer.a_lo, inner.a_lo, outer.b_lo, outer.b_hi))
    if inner.a_hi < outer.a_hi:
        parts.append(PhotometricBox(inner.a_hi, outer.a_hi, outer.b_lo, outer.b_hi))
    if outer.b_lo < inner.b_lo:
        parts.append(PhotometricBox(inner.a_lo, inner.a_hi, outer.b_lo, inner.b_lo))
    if inner.b_hi < outer.b_hi:
        parts.append(PhotometricBox(inner.a_lo, inner.a_hi, inner.b_hi, outer.b_hi))
    return parts


@dataclass
class RegionMap:
    """Status of each (a, b) cell of a grid over a box: status[i, j] for a-cell i, b-cell j."""

    a_edges: np.ndarray
    b_edges: np.ndarray
    status: np.ndarray  # (na, nb) of Status values as strings


def region_map(graph: Graph, image: torch.Tensor, prop: KeypointProperty, pixels: PixelMap,
               box: PhotometricBox, grid: tuple[int, int], bab: BabConfig = BabConfig()) -> RegionMap:
    na, nb = grid
    if na < 1 or nb < 1:
        raise CertificationError(f"region grid must be at least 1x1, got {na}x{nb}")
    a_edges = np.linspace(box.a_lo, box.a_hi, na + 1)
    b_edges = np.linspace(box.b_lo, box.b_hi, nb + 1)
    cells = [PhotometricBox(a_edges[i], a_edges[i + 1], b_edges[j], b_edges[j + 1])
             for i in range(na) for j in range(nb)]
    outcomes = certify_boxes(graph, image, prop, pixels, cells, bab)
    status = np.array([o.status.value for o in outcomes], dtype=object).reshape(na, nb)
    return RegionMap(a_edges, b_edges, status)
