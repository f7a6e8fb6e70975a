"""The certified region a bundle's runtime uses, chosen from a certification report (the
certification policy: the requested box when it reaches the coverage, else the largest of
the certified symmetric box, radius and region-map cells that do)."""

from __future__ import annotations

import math

from usn_offline.errors import BundleError
from usn_offline.perturb import PhotometricBox


def box_text(box: dict) -> str:
    return f"a in [{box['a_lo']:g}, {box['a_hi']:g}], b in [{box['b_lo']:g}, {box['b_hi']:g}]"


def certified_eps_fractions(report: dict) -> list[tuple[float, float]]:
    """(eps, certified fraction) of the symmetric boxes a in [1-eps, 1+eps], b in [-eps, eps]
    the certificate checked (``--eps``), eps > 0, smallest first.

    ``summary.certified_fraction_at_eps`` is keyed by ``f"{eps:g}"`` (6 significant digits),
    so a key may be rounded up from the eps actually certified; the exact values come from
    ``method.eps_list`` (keys without one there are ignored). Several eps sharing a key
    overwrote each other's statuses; the smallest of them is used, its box lying inside
    the others'.
    """
    fractions = report["summary"].get("certified_fraction_at_eps") or {}
    exact: dict[str, float] = {}
    for eps in report["method"].get("eps_list") or []:
        key = f"{eps:g}"
        exact[key] = min(float(eps), exact.get(key, math.inf))
    return sorted((exact[key], float(frac)) for key, frac in fractions.items() if key in exact and exact[key] > 0)


def _area(boxes: list[dict]) -> float:
    return sum((b["a_hi"] - b["a_lo"]) * (b["b_hi"] - b["b_lo"]) for b in boxes)


def certified_region(report: dict) -> dict:
    """The region the runtime uses: the requested box when it holds for at least the
    coverage fraction of the images; otherwise the largest (by area in the (a, b) plane)
    of the regions the certificate proves for that coverage — the largest symmetric eps box
    (``--eps``), the symmetric radius (``--radius-search``), the region-map cells
    (``--region-grid``). When it is not the requested box, the region says so
    (``requested_box``, ``requested_certified_fraction`` and a one-line ``reason`` naming
    what it uses)."""
    summary, pert, method = report["summary"], report["perturbation"], report["method"]
    coverage = method.get("coverage", 0.95)
    box = {k: pert[k] for k in ("a_lo", "a_hi", "b_lo", "b_hi")}
    fraction = summary["certified_fraction"]
    if fraction >= coverage:
        return {"kind": "box", "coverage": coverage, "certified_fraction": fraction, "boxes": [box]}

    candidates: list[tuple[dict, str]] = []  # (region, what it is), in order of preference on equal area
    eps_ok = [(eps, frac) for eps, frac in certified_eps_fractions(report) if frac >= coverage]
    if eps_ok:
        eps, frac = eps_ok[-1]
        sym = PhotometricBox.symmetric(eps, eps)  # the box certify checked, to the bit
        eps_box = {"a_lo": sym.a_lo, "a_hi": sym.a_hi, "b_lo": sym.b_lo, "b_hi": sym.b_hi}
        candidates.append(({"kind": "symmetric_eps", "eps": eps, "certified_fraction": frac, "boxes": [eps_box]},
                           f"the largest symmetric box certified for the coverage, eps = {eps:g} "
                           f"({box_text(eps_box)}, certified for {100 * frac:.1f} %)"))
    radius = summary.get("radius_at_coverage")
    if radius:
        scales = method.get("radius_search") or {}
        ec, eb = radius * scales.get("contrast_scale", 1.0), radius * scales.get("brightness_scale", 1.0)
        r_box = {"a_lo": 1 - ec, "a_hi": 1 + ec, "b_lo": -eb, "b_hi": eb}
        candidates.append(({"kind": "symmetric_radius", "radius": radius, "boxes": [r_box]},
                           f"the certified radius {radius:g} ({box_text(r_box)}), reached by "
                           f">= {100 * coverage:g} % of the images"))
    cells = summary.get("region_cells_at_coverage")
    edges = report.get("region_edges")
    if cells and edges and any(map(any, cells)):
        a, b = edges["a"], edges["b"]
        boxes = [{"a_lo": a[i], "a_hi": a[i + 1], "b_lo": b[j], "b_hi": b[j + 1]}
                 for i, row in enumerate(cells) for j, ok in enumerate(row) if ok]
        candidates.append(({"kind": "region_map_cells", "boxes": boxes},
                           f"{len(boxes)} of {sum(map(len, cells))} region-map cells of the requested box, "
                           f"each certified for >= {100 * coverage:g} % of the images"))
    if not candidates:
        raise BundleError(f"the certificate proves no region for {100 * coverage:g} % of the images "
                          f"(certified {100 * fraction:.1f} %); certify a smaller box, "
                          "or add --eps, --radius-search or --region-grid")
    region, used = max(candidates, key=lambda c: _area(c[0]["boxes"]))  # the first of equals
    others = len(candidates) - 1
    reason = (f"the requested box {box_text(box)} is certified for {100 * fraction:.1f} % of the images, "
              f"below the {100 * coverage:g} % coverage: the runtime uses {used}"
              + (f", the largest of the {others + 1} regions proved for the coverage" if others else ""))
    return {**region, "coverage": coverage, "requested_box": box, "requested_certified_fraction": fraction,
            "reason": reason}
