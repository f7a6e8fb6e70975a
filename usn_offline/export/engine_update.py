"""Add a TensorRT engine to an existing bundle (on the target machine), re-binding the
certificate and manifest to it."""

from __future__ import annotations

import json

from usn_offline.export.tensorrt_engine import build_engine
from usn_offline.runtime.bundle import CERTIFICATE, ENGINE, MANIFEST, Bundle
from usn_offline.runtime.hashing import sha256_file


def add_engine_to_bundle(bundle: Bundle, fp16: bool = False, workspace_mb: int = 1024) -> Bundle:
    engine = build_engine(bundle.onnx_path, bundle.root / ENGINE, fp16, workspace_mb)
    certificate = dict(bundle.certificate)
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
    return Bundle.load(bundle.root)
