"""Build a TensorRT engine from the bundle's ONNX model (TensorRT Python API).

Engines are specific to the TensorRT version, the GPU and the precision, so they are
built on the target (``usn-offline build-engine``, or the node on first start) and the
cache key names all of them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from usn_offline.errors import BundleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    path: Path
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str

    def cache_key(self, onnx_sha256: str) -> str:
        text = "|".join([onnx_sha256, self.tensorrt_version, self.gpu_name, self.compute_capability,
                         self.precision])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when tensorrt imports and a CUDA GPU is visible, else (False, why)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt Python package is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:
        pass
    return True, ""


def _gpu() -> tuple[str, str]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except ImportError:
        pass
    return "unknown", "unknown"


def build_engine(onnx_path: Path | str, engine_path: Path | str, fp16: bool = False,
                 workspace_mb: int = 1024) -> EngineInfo:
    """Parse the ONNX model and serialise an engine (FP32 unless ``fp16``)."""
    ok, why = tensorrt_available()
    if not ok:
        raise BundleError(f"cannot build a TensorRT engine here: {why}; build it on the target with "
                          "'usn-offline build-engine --bundle DIR'")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise BundleError("--fp16 requested but this GPU has no fast FP16")
        config.set_flag(trt.BuilderFlag.FP16)
    log.info("building TensorRT %s engine from %s (workspace %d MiB)", trt.__version__, onnx_path, workspace_mb)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    gpu, capability = _gpu()
    return EngineInfo(Path(engine_path), trt.__version__, gpu, capability, "fp16" if fp16 else "fp32")
