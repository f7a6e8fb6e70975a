"""Add a TensorRT engine to an existing bundle (on the target machine), re-binding the
certificate and manifest to it."""

from __future__ import annotations

import logging

from usn_offline.jsonio import write_json_atomic
from usn_offline.runtime.backends import engine_gap_px
from usn_offline.runtime.bundle import CERTIFICATE, ENGINE, MANIFEST, Bundle
from usn_offline.runtime.hashing import sha256_file
from usn_offline.runtime.signing import SIGNATURE
from usn_offline.runtime.tensorrt_engine import TensorRTRunner, build_engine, engine_record

log = logging.getLogger(__name__)


def add_engine_to_bundle(bundle: Bundle, fp16: bool = False, workspace_mb: int = 1024,
                         gap_tolerance_px: float = 0.05) -> Bundle:
    from usn_offline.errors import BundleError

    engine = build_engine(bundle.onnx_path, bundle.root / ENGINE, fp16, workspace_mb)
    gap = engine_gap_px(bundle, TensorRTRunner(engine.path).infer)
    if gap > gap_tolerance_px:
        (bundle.root / ENGINE).unlink()
        raise BundleError(f"the TensorRT engine deviates up to {gap:.4f} px from the model, more than "
                          f"{gap_tolerance_px} px: engine discarded (try without --fp16)")
    certificate = dict(bundle.certificate)
    certificate["deployment_gap_by_backend_px"] = {**certificate["deployment_gap_by_backend_px"],
                                                   "tensorrt": gap}
    certificate["deployment_gap_px"] = max(certificate["deployment_gap_px"], gap)
    certificate["effective_delta_px"] = certificate["delta_px"] + certificate["deployment_gap_px"]
    certificate["engine"] = engine_record(engine, bundle.model_sha256)
    # Certificate, then manifest, each replaced whole: in between, the manifest's hashes
    # refuse the bundle (Bundle.load) rather than serve a half-updated one.
    write_json_atomic(bundle.root / CERTIFICATE, certificate)
    manifest = dict(bundle.manifest)
    files = dict(manifest["files"])
    for name in (ENGINE, CERTIFICATE):
        path = bundle.root / name
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = files
    target = engine.target
    manifest["engine_status"] = f"built ({target.precision}, TensorRT {target.tensorrt_version}, {target.gpu_name})"
    write_json_atomic(bundle.root / MANIFEST, manifest)
    signature = bundle.root / SIGNATURE
    if signature.exists():  # it signed the manifest before the engine: no longer valid
        signature.unlink()
        log.warning("%s: the bundle's signature covered the manifest without the engine and was removed: "
                    "re-sign it with 'usn-offline sign --bundle %s --key KEY'", bundle.root, bundle.root)
    return Bundle.load(bundle.root)
