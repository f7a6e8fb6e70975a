"""Add a TensorRT engine to an existing bundle (on the target machine), re-binding the
certificate and manifest to it."""

from __future__ import annotations

import json
import logging

import numpy as np

from usn_offline.export.tensorrt_engine import TensorRTRunner, build_engine
from usn_offline.runtime.backends import OnnxRuntimeBackend
from usn_offline.runtime.bundle import CERTIFICATE, ENGINE, MANIFEST, Bundle
from usn_offline.runtime.hashing import sha256_file
from usn_offline.runtime.preprocess import normalised_to_pixels
from usn_offline.runtime.signing import SIGNATURE

log = logging.getLogger(__name__)


def engine_gap_px(bundle: Bundle, runner: TensorRTRunner, count: int = 64) -> float:
    """Deviation of the engine from the torch model, bounded without torch's model on the
    target: gap(ORT vs torch, recorded at export) + max |TensorRT - ORT| on random images."""
    h, w = bundle.preprocess.input_height, bundle.preprocess.input_width
    x = np.random.default_rng(0).random((count, 1, h, w), dtype=np.float32)
    ort_out = OnnxRuntimeBackend(bundle.onnx_path).infer(x).reshape(count, -1, 2)
    trt_out = np.asarray(runner.infer(x)).reshape(count, -1, 2)
    diff = np.abs(normalised_to_pixels(trt_out, h, w) - normalised_to_pixels(ort_out, h, w)).max()
    return bundle.certificate["deployment_gap_by_backend_px"]["onnxruntime"] + float(diff)


def add_engine_to_bundle(bundle: Bundle, fp16: bool = False, workspace_mb: int = 1024,
                         gap_tolerance_px: float = 0.05) -> Bundle:
    from usn_offline.errors import BundleError

    engine = build_engine(bundle.onnx_path, bundle.root / ENGINE, fp16, workspace_mb)
    gap = engine_gap_px(bundle, TensorRTRunner(engine.path))
    if gap > gap_tolerance_px:
        (bundle.root / ENGINE).unlink()
        raise BundleError(f"the TensorRT engine deviates up to {gap:.4f} px from the model, more than "
                          f"{gap_tolerance_px} px: engine discarded (try without --fp16)")
    certificate = dict(bundle.certificate)
    certificate["deployment_gap_by_backend_px"] = {**certificate["deployment_gap_by_backend_px"],
                                                   "tensorrt": gap}
    certificate["deployment_gap_px"] = max(certificate["deployment_gap_px"], gap)
    certificate["effective_delta_px"] = certificate["delta_px"] + certificate["deployment_gap_px"]
    certificate["engine"] = {"sha256": sha256_file(engine.path), "tensorrt_version": engine.tensorrt_version,
                             "gpu": engine.gpu_name, "compute_capability": engine.compute_capability,
                             "precision": engine.precision}
    (bundle.root / CERTIFICATE).write_text(json.dumps(certificate, indent=1))
    manifest = dict(bundle.manifest)
    files = dict(manifest["files"])
    for name in (ENGINE, CERTIFICATE):
        path = bundle.root / name
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = files
    manifest["engine_status"] = (f"built ({engine.precision}, TensorRT {engine.tensorrt_version}, "
                                 f"{engine.gpu_name})")
    (bundle.root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    signature = bundle.root / SIGNATURE
    if signature.exists():  # it signed the manifest before the engine: no longer valid
        signature.unlink()
        log.warning("%s: the bundle's signature covered the manifest without the engine and was removed: "
                    "re-sign it with 'usn-offline sign --bundle %s --key KEY'", bundle.root, bundle.root)
    return Bundle.load(bundle.root)
