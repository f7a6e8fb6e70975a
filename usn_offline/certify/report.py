"""The certification report: schema-versioned JSON and a printed summary table."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from usn_offline import __version__
from usn_offline.certify.bab import Status
from usn_offline.certify.bounds import DEFAULT_MARGIN
from usn_offline.certify.engine import CertificationReport, CertifyConfig
from usn_offline.certify.lirpa import LIRPA_MARGIN
from usn_offline.errors import BundleError
from usn_offline.jsonio import read_json_object
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


def _image_scale(report: CertificationReport, index: int) -> tuple[float, float] | None:
    """(x, y) image pixels per network-input pixel of one image, None when unknown."""
    if report.network_hw is None or report.image_hw is None:
        return None
    (h, w), (net_h, net_w) = report.image_hw[index], report.network_hw
    return w / net_w, h / net_h


def image_pixel_figures(report: CertificationReport) -> tuple[dict, list[dict]]:
    """delta and each certified image's proven bound in the images' own pixels: the
    property's per-axis range of delta over the images, and per image its stored size,
    delta and (when certified) the largest proven deviation per axis. The proof itself is
    in network-input pixels (``property.delta_px``); these are the same figures scaled."""
    delta = report.config.delta
    per_image, xs, ys = [], [], []
    for i, result in enumerate(report.images):
        scale = _image_scale(report, i)
        if scale is None:
            return {}, []
        sx, sy = scale
        entry = {"image_hw": list(report.image_hw[i]), "delta_image_px": [delta * sx, delta * sy]}
        xs.append(delta * sx)
        ys.append(delta * sy)
        if result.status is Status.CERTIFIED:
            ref, lo, hi = (torch.tensor(v, dtype=torch.float64).reshape(-1, 2)
                           for v in (result.reference_px, result.lower_px, result.upper_px))
            bound = torch.maximum(ref - lo, hi - ref).amax(dim=0)
            entry["bound_image_px"] = [float(bound[0]) * sx, float(bound[1]) * sy]
        per_image.append(entry)
    if not per_image:
        return {}, []
    return {"network_input_hw": list(report.network_hw),
            "delta_image_px": {"x": [min(xs), max(xs)], "y": [min(ys), max(ys)]}}, per_image


def report_to_dict(report: CertificationReport, checkpoint: Path | str, data: Path | str, split: str) -> dict:
    cfg = report.config
    units, per_image = image_pixel_figures(report)
    images = [_plain(r) for r in report.images]
    for doc, extra in zip(images, per_image, strict=False):
        doc.update(extra)
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
        "property": {"delta_px": cfg.delta, "norm": cfg.norm.value, "reference": cfg.reference.value,
                     "units": "delta_px and every *_px bound: network-input pixels; *_image_px: the images' own",
                     **units},
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
        "images": images,
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
            ("property", f"{cfg.norm.value} <= {cfg.delta:g} px vs {cfg.reference.value}"
                         + ("" if report.network_hw is None else
                            f" (network input {report.network_hw[1]}x{report.network_hw[0]} px)")),
            ("method", f"{cfg.bab.method.value} + branch and bound ({cfg.dtype})"),
            *_image_delta_row(report),
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


def _image_delta_row(report: CertificationReport) -> list[tuple[str, str]]:
    """delta in the images' own pixels, when they are stored at another size."""
    units, _ = image_pixel_figures(report)
    if not units or {tuple(hw) for hw in report.image_hw} == {tuple(report.network_hw)}:
        return []
    (x_lo, x_hi), (y_lo, y_hi) = units["delta_image_px"]["x"], units["delta_image_px"]["y"]
    span = lambda lo, hi: f"{lo:.3g}" if math.isclose(lo, hi) else f"{lo:.3g}-{hi:.3g}"  # noqa: E731
    sizes = ", ".join(sorted({f"{w}x{h}" for h, w in report.image_hw}))
    return [("delta in image pixels", f"x {span(x_lo, x_hi)} px, y {span(y_lo, y_hi)} px (stored {sizes})")]


# (path, type) of the report fields the export reads; numbers are finite.
_REPORT_FIELDS = (("model", dict), ("model.sha256", str), ("property", dict), ("property.delta_px", float),
                  ("property.norm", str), ("property.reference", str), ("perturbation", dict),
                  ("perturbation.a_lo", float), ("perturbation.a_hi", float), ("perturbation.b_lo", float),
                  ("perturbation.b_hi", float), ("summary", dict), ("summary.certified_fraction", float),
                  ("summary.num_images", int), ("data", dict), ("data.root", str), ("data.split", str),
                  ("method", dict))


def _field(doc: dict, path: str, kind: type) -> object:
    """The value at ``path`` (dotted), refused (BundleError naming it) when missing or not
    of ``kind`` (float: a finite number)."""
    value: object = doc
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        raise BundleError(f"the certificate has no field '{path}' (not a complete certify report)")
    numeric = kind in (float, int) and not isinstance(value, bool)
    if kind is float and not (numeric and isinstance(value, (int, float)) and math.isfinite(value)):
        raise BundleError(f"the certificate's field '{path}' must be a finite number, got {value!r}")
    if kind is not float and not isinstance(value, kind) or (kind is int and not numeric):
        noun = {str: "a string", int: "an integer", dict: "an object"}[kind]
        raise BundleError(f"the certificate's field '{path}' must be {noun}, got {value!r}")
    return value


def _check_claims(doc: dict, values: dict) -> None:
    """The report's claims must be ones ``certify`` can make, and agree with its per-image
    results: a hand-edited report claims no more than was proved (BundleError naming it)."""
    box = doc["perturbation"]
    a_lo, a_hi, b_lo, b_hi = (values[f"perturbation.{k}"] for k in ("a_lo", "a_hi", "b_lo", "b_hi"))
    if not 0 < a_lo <= a_hi or not b_lo <= b_hi:
        raise BundleError(f"the certificate's box a in [{a_lo}, {a_hi}], b in [{b_lo}, {b_hi}] is empty or has "
                          "a contrast <= 0")
    if box.get("clip") is not True:
        raise BundleError("the certificate is not for clipped images (perturbation.clip is not true): camera "
                          "frames are clip(a*x + b, 0, 1), certify without --no-clip for a bundle")
    if values["property.delta_px"] < 0:
        raise BundleError(f"the certificate's delta_px {values['property.delta_px']} is negative")
    if values["property.norm"] not in ("linf", "l2"):
        raise BundleError(f"the certificate's norm {values['property.norm']!r} is not linf or l2")
    if values["property.reference"] not in ("prediction", "ground_truth"):
        raise BundleError(f"the certificate's reference {values['property.reference']!r} is not prediction or "
                          "ground_truth")
    n, fraction = values["summary.num_images"], values["summary.certified_fraction"]
    images = doc.get("images")
    if n < 1 or not isinstance(images, list) or len(images) != n:
        raise BundleError(f"the certificate's summary counts {n} images, its per-image results "
                          f"{len(images) if isinstance(images, list) else 'none'}")
    certified = sum(isinstance(r, dict) and r.get("status") == Status.CERTIFIED.value for r in images)
    if abs(fraction - certified / n) > 1e-9:
        raise BundleError(f"the certificate's certified_fraction {fraction} disagrees with its per-image results "
                          f"({certified} of {n} certified)")


@dataclass(frozen=True)
class CertificateReport:
    """A certification report as ``usn-offline certify`` wrote it, validated for the
    export: the fields it reads, typed, and the document (its perturbation, data and
    method sections are copied into the bundle's certificate as written)."""

    document: dict
    model_sha256: str
    delta_px: float
    norm: str
    reference: str
    certified_fraction: float
    num_images: int
    data_root: str
    data_split: str

    @classmethod
    def from_document(cls, doc: object) -> CertificateReport:
        """Validate a parsed report; BundleError names the first field it cannot use."""
        if not isinstance(doc, dict) or doc.get("kind") != "usn-certification-report":
            raise BundleError("the --certificate file is not a usn-offline certification report")
        values = {path: _field(doc, path, kind) for path, kind in _REPORT_FIELDS}
        _check_claims(doc, values)
        return cls(document=doc, model_sha256=values["model.sha256"], delta_px=float(values["property.delta_px"]),
                   norm=values["property.norm"], reference=values["property.reference"],
                   certified_fraction=float(values["summary.certified_fraction"]),
                   num_images=values["summary.num_images"], data_root=values["data.root"],
                   data_split=values["data.split"])

    @property
    def perturbation(self) -> dict:
        return self.document["perturbation"]


def load_report(path: Path | str) -> CertificateReport:
    """Read and validate a certification report (BundleError, one line, when it is
    missing, not JSON, of another schema or incomplete)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"certificate not found: {path}")
    doc = read_json_object(path, BundleError)
    if type(doc.get("schema_version")) is not int or doc.get("schema_version") != REPORT_SCHEMA_VERSION:
        raise BundleError(f"{path}: not a schema_version {REPORT_SCHEMA_VERSION} certification report")
    return CertificateReport.from_document(doc)
