"""Write the deployment bundle: ONNX model, optional TensorRT engine, a certificate bound
to the exact model file, and a manifest with hashes."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usn_offline import __version__
from usn_offline.certify.region import box_text, certified_region
from usn_offline.certify.report import CertificateReport
from usn_offline.data.dataset import KeypointDataset
from usn_offline.errors import BundleError
from usn_offline.export.onnx_model import INPUT_NAME, OUTPUT_NAME, export_onnx
from usn_offline.jsonio import loads_strict
from usn_offline.models import KeypointNet
from usn_offline.runtime.backends import OnnxRuntimeBackend
from usn_offline.runtime.bundle import (
    CERTIFICATE,
    CERTIFICATE_SCHEMA_VERSION,
    ENGINE,
    MANIFEST,
    MANIFEST_SCHEMA_VERSION,
    ONNX_MODEL,
    Bundle,
)
from usn_offline.runtime.hashing import sha256_file
from usn_offline.runtime.monitor import nominal_from_images
from usn_offline.runtime.preprocess import normalised_to_pixels
from usn_offline.runtime.signing import SIGNATURE, load_private_key, sign_manifest
from usn_offline.runtime.tensorrt_engine import TensorRTRunner, build_engine, engine_record, tensorrt_available
from usn_offline.train.checkpoint import CheckpointInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    gap_tolerance_px: float = 0.05  # a backend deviating more than this from torch fails the export
    build_engine: bool = True  # when TensorRT and a GPU are present
    fp16: bool = False
    workspace_mb: int = 1024
    gap_images: int = 200
    sign_key: Path | None = None  # Ed25519 private key (usn-offline keygen): writes manifest.sig


def deployment_gap_px(model: KeypointNet, backend_infer, dataset: KeypointDataset, count: int) -> float:
    """Largest keypoint deviation (pixels) between the certified model and a backend on the
    first ``count`` images of ``dataset`` plus as many random images. The certified model is
    the network in float64 (what the certificate's bounds are about): a float32 backend's
    own rounding is part of its gap."""
    h, w = dataset.image_hw
    rng = np.random.default_rng(0)
    real = dataset.images[:count].astype(np.float32)
    noise = rng.random((min(count, 32), h, w), dtype=np.float32)
    exact = copy.deepcopy(model).cpu().eval().double()
    worst = 0.0
    for batch in (real, noise):
        x = batch[:, None]
        with torch.no_grad():
            ref = exact(torch.from_numpy(x).double()).numpy()
        got = np.asarray(backend_infer(x))
        diff = np.abs(normalised_to_pixels(got.reshape(len(x), -1, 2), h, w)
                      - normalised_to_pixels(ref.reshape(len(x), -1, 2), h, w))
        worst = max(worst, float(diff.max()))
    return worst


def write_bundle(out: Path | str, model: KeypointNet, info: CheckpointInfo, checkpoint: Path | str,
                 report: CertificateReport, gap_data: KeypointDataset, nominal_data: KeypointDataset,
                 config: ExportConfig = ExportConfig()) -> Bundle:
    """Export everything into ``out`` and return the bundle as the loader sees it.

    ``out`` must be new, empty or an earlier bundle of ours (replaced as a whole); anything
    else is refused before any work, and nothing but a bundle is ever deleted."""
    out = check_bundle_target(out)
    if config.sign_key is not None:
        load_private_key(config.sign_key)  # a bad key fails before any work
    ck_sha = sha256_file(checkpoint)
    if report.model_sha256 != ck_sha:
        raise BundleError(f"the certificate was computed for another checkpoint (sha256 "
                          f"{report.model_sha256[:12]}... != {Path(checkpoint).name} {ck_sha[:12]}...)")
    region = certified_region(report.document)
    if "reason" in region:
        log.warning("%s", region["reason"])
    out.parent.mkdir(parents=True, exist_ok=True)
    # A folder of our own beside ``out`` (a fixed name could be someone's folder).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write_into(tmp, out, model, info, ck_sha, report, region, gap_data, nominal_data, config)
        checked = Bundle.load(tmp)  # as the node will check it, before an earlier bundle is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written bundle is left behind
        raise
    if out.exists():
        shutil.rmtree(out)  # an earlier bundle of ours (check_bundle_target)
    tmp.rename(out)
    return dataclasses.replace(checked, root=out)


def _json(document: dict, name: str) -> str:
    """``document`` as strict JSON: NaN or infinity (e.g. statistics of images with NaN
    pixels) refuse the export, naming the file, instead of writing a bundle no loader accepts."""
    try:
        return json.dumps(document, indent=1, allow_nan=False)
    except ValueError as exc:
        raise BundleError(f"{name} would hold NaN or infinite values ({exc}): export refused") from exc


BUNDLE_FILES = frozenset({MANIFEST, CERTIFICATE, ONNX_MODEL, ENGINE, SIGNATURE})


def check_bundle_target(out: Path | str) -> Path:
    """The resolved ``out`` of an export, refused (BundleError) unless it is a new or
    empty folder or a bundle written by us (a manifest of kind usn-bundle and nothing but
    bundle files), so that replacing it cannot delete anything else."""
    path = Path(out).expanduser().resolve()
    if path.parent == path:
        raise BundleError(f"--out {out}: cannot write a bundle to the root of the file system")
    if path.exists() and not path.is_dir():
        raise BundleError(f"--out {out} is a file, not a folder: choose a new folder for the bundle")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        foreign = [name for name in entries if name not in BUNDLE_FILES or not (path / name).is_file()]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BundleError(f"--out {out} holds files that are not part of a bundle ({shown}): choose a new or "
                              "empty folder (export replaces only an earlier bundle)")
        if entries and _manifest_kind(path / MANIFEST) != "usn-bundle":
            raise BundleError(f"--out {out} is not empty and not a bundle written by usn-offline "
                              f"(no valid {MANIFEST}): choose a new or empty folder")
    return path


def _manifest_kind(path: Path) -> str | None:
    try:
        doc = loads_strict(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return doc.get("kind") if isinstance(doc, dict) else None


def _write_into(tmp: Path, out: Path, model: KeypointNet, info: CheckpointInfo, ck_sha: str, report: CertificateReport,
                region: dict, gap_data: KeypointDataset, nominal_data: KeypointDataset, config: ExportConfig
                ) -> None:

    onnx_path = export_onnx(model, info, tmp / ONNX_MODEL)
    onnx_sha = sha256_file(onnx_path)
    backend = OnnxRuntimeBackend(onnx_path)
    gaps = {"onnxruntime": deployment_gap_px(model, backend.infer, gap_data, config.gap_images)}
    engine = None
    if config.build_engine:
        ok, why = tensorrt_available()
        if ok:
            engine = build_engine(onnx_path, tmp / ENGINE, config.fp16, config.workspace_mb)
            runner = TensorRTRunner(engine.path)
            gaps["tensorrt"] = deployment_gap_px(model, runner.infer, gap_data, config.gap_images)
        else:
            log.warning("no TensorRT engine built (%s): build it on the target with "
                        "'usn-offline build-engine --bundle %s'", why, out)
    for name, gap in gaps.items():
        if gap > config.gap_tolerance_px:
            raise BundleError(f"{name} deviates {gap:.4f} px from the torch model, more than the "
                              f"tolerance {config.gap_tolerance_px} px: export refused")
    gap = max(gaps.values())

    summary = report.document["summary"]
    certificate = {
        "schema_version": CERTIFICATE_SCHEMA_VERSION,
        "kind": "usn-bundle-certificate",
        "model_sha256": onnx_sha,
        "checkpoint_sha256": ck_sha,
        "perturbation": report.perturbation,
        "region": region,
        "delta_px": report.delta_px,
        "norm": report.norm,
        "reference": report.reference,
        "deployment_gap_px": gap,
        "deployment_gap_by_backend_px": gaps,
        "effective_delta_px": report.delta_px + gap,
        "certified_fraction": report.certified_fraction,
        "certified_fraction_at_eps": summary.get("certified_fraction_at_eps", {}),
        "num_certified_images": report.num_images,
        "data": report.document["data"],
        "method": report.document["method"],
        "nominal_statistics": dataclasses.asdict(nominal_from_images(nominal_data.images)),
        "engine": None if engine is None else engine_record(engine, onnx_sha),
    }
    (tmp / CERTIFICATE).write_text(_json(certificate, CERTIFICATE))
    files = [ONNX_MODEL, CERTIFICATE] + ([ENGINE] if engine else [])
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "kind": "usn-bundle",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool_version": __version__,
        "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in files},
        "input": {"name": INPUT_NAME, "shape": [1, info.model.in_channels, info.model.input_height,
                                                info.model.input_width], "dtype": "float32", "range": [0, 1]},
        "output": {"name": OUTPUT_NAME, "shape": [1, info.model.num_outputs],
                   "convention": "normalised u = 2 (x + 0.5) / W - 1, pairs (x, y) per keypoint"},
        "keypoint_names": list(info.keypoint_names),
        "preprocessing": info.preprocess.to_dict(),
        "model": info.model.to_dict(),
        "deployment_gap_px": gaps,
        "engine_status": "built" if engine else "not built: build on the target (usn-offline build-engine)",
    }
    (tmp / MANIFEST).write_text(_json(manifest, MANIFEST))
    if config.sign_key is not None:
        sign_manifest(tmp, config.sign_key)


def bundle_summary(bundle: Bundle) -> list[tuple[str, str]]:
    rows = [(name, f"{(bundle.root / name).stat().st_size / 1024:.1f} KiB")
            for name in bundle.manifest["files"]]
    region = bundle.certificate["region"]
    for i, box in enumerate(bundle.region):
        rows.append((f"certified region {i}" if len(bundle.region) > 1 else "certified region",
                     f"a in [{box.a_lo:g}, {box.a_hi:g}], b in [{box.b_lo:g}, {box.b_hi:g}]"))
    rows.append(("region kind", f"{region['kind']} (coverage {100 * region['coverage']:g} %)"))
    if "requested_box" in region:  # a fallback: say what was asked for and what is used instead
        rows += [("requested box", f"{box_text(region['requested_box'])}: certified "
                                   f"{100 * region['requested_certified_fraction']:.1f} % < "
                                   f"{100 * region['coverage']:g} %"),
                 ("region used instead", _region_used(region))]
    rows.append(("certified images", f"{100 * bundle.certificate['certified_fraction']:.1f} % of "
                                     f"{bundle.certificate['num_certified_images']}"))
    rows += [(f"certified at eps={eps}", f"{100 * frac:.1f} %")
             for eps, frac in bundle.certificate.get("certified_fraction_at_eps", {}).items()]
    rows += [
             ("delta", f"{bundle.delta_px:g} px ({bundle.certificate['norm']})"),
             ("deployment gap", f"{bundle.deployment_gap_px:.2e} px"),
             ("effective delta", f"{bundle.effective_delta_px:.6f} px"),
             ("engine", bundle.manifest["engine_status"])]
    return rows


def _region_used(region: dict) -> str:
    kind = region["kind"]
    if kind == "symmetric_eps":
        return f"symmetric eps = {region['eps']:g}, certified {100 * region['certified_fraction']:.1f} %"
    if kind == "symmetric_radius":
        return f"certified radius {region['radius']:g} (>= {100 * region['coverage']:g} % of images)"
    if kind == "region_map_cells":
        return f"{len(region['boxes'])} region-map cells (each >= {100 * region['coverage']:g} % of images)"
    return kind
