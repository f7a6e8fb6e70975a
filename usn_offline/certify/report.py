"""The certification report: schema-versioned JSON and a printed summary table."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from usn_offline import __version__
from usn_offline.certify.bab import Status
from usn_offline.certify.bounds import DEFAULT_MARGIN
from usn_offline.certify.engine import CertificationReport, CertifyConfig
from usn_offline.certify.lirpa import LIRPA_MARGIN
from usn_offline.runtime.hashing import sha256_file
from usn_offline.tables import format_table

REPORT_SCHEMA_VERSION = 1


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and isinstance(value.value, str):  # enums
        return value.value
    return value


def summary(report: CertificationReport) -> dict:
    n = len(report.images)
    out = {
        "num_images": n,
        "certified": report.count(Status.CERTIFIED),
        "falsified": report.count(Status.FALSIFIED),
        "not_certified": report.count(Status.NOT_CERTIFIED),
        "certified_fraction": report.count(Status.CERTIFIED) / n if n else 0.0,
        "mean_seconds_per_image": report.seconds / n if n else 0.0,
        "certified_fraction_at_eps": {f"{k:g}": v for k, v in report.certified_fraction_at().items()},
    }
    radii = [r.radius for r in report.images if r.radius is not None]
    if report.config.radius is not None:
        out["mean_certified_radius"] = sum(radii) / n if n else 0.0
        out["radius_at_coverage"] = report.radius_at_coverage()
    frac = report.region_fraction()
    if frac is not None:
        out["region_certified_fraction"] = frac.tolist()
        out["region_cells_at_coverage"] = (frac >= report.config.coverage).tolist()
    return out


def rounding_margin(cfg: CertifyConfig) -> str:
    """The outward margin every bound got for floating-point rounding, in words."""
    if cfg.bab.bounds.backend == "auto_lirpa":
        return f"auto_LiRPA float32 bounds widened by {LIRPA_MARGIN:g} * (1 + |bound|) px"
    dtype = getattr(torch, cfg.dtype)
    margin = DEFAULT_MARGIN.get(dtype, 1e-4) if cfg.bab.bounds.margin is None else cfg.bab.bounds.margin
    return f"{cfg.dtype} bounds widened by {margin:g} * (1 + |bound|) px"


def report_to_dict(report: CertificationReport, checkpoint: Path | str, data: Path | str, split: str) -> dict:
    cfg = report.config
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "usn-certification-report",
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"checkpoint": str(checkpoint), "sha256": sha256_file(checkpoint)},
        "data": {"root": str(data), "split": split, "num_images": len(report.images)},
        "perturbation": {"a_lo": cfg.box.a_lo, "a_hi": cfg.box.a_hi, "b_lo": cfg.box.b_lo,
                         "b_hi": cfg.box.b_hi, "clip": cfg.clip,
                         "formula": "x' = clip(a*x + b, 0, 1)" if cfg.clip else "x' = a*x + b"},
        "property": {"delta_px": cfg.delta, "norm": cfg.norm.value, "reference": cfg.reference.value},
        "method": {"bound": cfg.bab.method.value, "dtype": cfg.dtype,
                   "intermediate": cfg.bab.bounds.intermediate, "backend": cfg.bab.bounds.backend,
                   "rounding_margin": rounding_margin(cfg), "bab": _plain(cfg.bab),
                   "radius_search": _plain(cfg.radius), "eps_list": list(cfg.eps_list),
                   "region_grid": list(cfg.region_grid) if cfg.region_grid else None,
                   "coverage": cfg.coverage},
        "summary": summary(report),
        "region_edges": ({"a": report.region_edges[0], "b": report.region_edges[1]}
                         if report.region_edges else None),
        "timings": {"total_seconds": report.seconds},
        "images": [_plain(r) for r in report.images],
    }


def write_report(path: Path | str, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def summary_table(report: CertificationReport) -> str:
    s = summary(report)
    cfg = report.config
    rows = [("box", f"a in [{cfg.box.a_lo:g}, {cfg.box.a_hi:g}], b in [{cfg.box.b_lo:g}, {cfg.box.b_hi:g}]"),
            ("property", f"{cfg.norm.value} <= {cfg.delta:g} px vs {cfg.reference.value}"),
            ("method", f"{cfg.bab.method.value} + branch and bound ({cfg.dtype})"),
            ("images", str(s["num_images"])),
            ("certified", f"{s['certified']} ({100 * s['certified_fraction']:.1f} %)"),
            ("falsified", str(s["falsified"])),
            ("not certified (budget)", str(s["not_certified"])),
            ("time per image", f"{s['mean_seconds_per_image']:.2f} s")]
    rows += [(f"certified at eps={k}", f"{100 * v:.1f} %") for k, v in s["certified_fraction_at_eps"].items()]
    if "mean_certified_radius" in s:
        rows.append(("mean certified radius", f"{s['mean_certified_radius']:.4f}"))
        r = s["radius_at_coverage"]
        rows.append((f"radius for {100 * cfg.coverage:g} % of images", "none" if r is None else f"{r:.4f}"))
    if "region_cells_at_coverage" in s:
        cells = sum(map(sum, s["region_cells_at_coverage"]))
        total = sum(map(len, s["region_cells_at_coverage"]))
        rows.append((f"region cells >= {100 * cfg.coverage:g} %", f"{cells}/{total}"))
    return format_table(rows)
