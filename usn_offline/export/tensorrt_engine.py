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
    except ImportError:  # the runner's CUDA buffers are torch tensors
        return False, "the TensorRT runner needs torch (its CUDA buffers), which is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
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


class TensorRTRunner:
    """Run a serialised engine on batches (torch CUDA tensors as device buffers; used by the
    export's deployment-gap check, where torch is present)."""

    def __init__(self, engine_path: Path | str) -> None:
        ok, why = tensorrt_available()
        if not ok:
            raise BundleError(f"cannot run a TensorRT engine here: {why}")
        import tensorrt as trt

        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BundleError(f"{engine_path}: TensorRT cannot deserialise this engine (built with another "
                              "TensorRT version or for another GPU?); rebuild: 'usn-offline build-engine'")
        self.context = self.engine.create_execution_context()
        if hasattr(self.engine, "num_io_tensors"):  # TensorRT >= 8.5 tensor API
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            modes = {n: self.engine.get_tensor_mode(n) for n in names}
            self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
            self.output_name = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
            self.input_shape = tuple(self.engine.get_tensor_shape(self.input_name))
            self.output_shape = tuple(self.engine.get_tensor_shape(self.output_name))
        else:  # pragma: no cover - TensorRT < 8.5
            raise BundleError(f"TensorRT {trt.__version__} is too old (need >= 8.5)")

    def infer(self, batch):
        import numpy as np
        import torch

        outputs = []
        for start in range(0, len(batch), self.input_shape[0]):
            chunk = torch.from_numpy(np.ascontiguousarray(batch[start:start + self.input_shape[0]],
                                                          dtype=np.float32)).cuda()
            out = torch.empty(self.output_shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.input_name, chunk.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise BundleError("TensorRT inference failed")
            stream.synchronize()
            outputs.append(out.cpu().numpy())
        return np.concatenate(outputs)
