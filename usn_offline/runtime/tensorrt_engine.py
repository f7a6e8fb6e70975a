"""TensorRT engines without torch: build one from the bundle's ONNX model, run it, and
decide which engine file may be used (TensorRT Python API + NVIDIA's cuda-python for the
device buffers, as on a robot that has no torch).

Engines are specific to the TensorRT version, the GPU and the precision, so they are
built on the target (``usn-offline build-engine``, or the node on first start) and an
engine is used only where its record (ONNX hash, TensorRT version, GPU, compute
capability, precision and the engine file's own hash) matches this machine and the file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usn_offline.errors import BundleError
from usn_offline.jsonio import write_json_atomic
from usn_offline.runtime.hashing import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is specific to: the TensorRT version, the GPU and the precision."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str  # "fp32" | "fp16"

    def cache_key(self, onnx_sha256: str) -> str:
        text = "|".join([onnx_sha256, self.tensorrt_version, self.gpu_name, self.compute_capability,
                         self.precision])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def record(self) -> dict:
        """The fields a certificate or cache record names (``gpu`` as certificates spell it)."""
        return {"tensorrt_version": self.tensorrt_version, "gpu": self.gpu_name,
                "compute_capability": self.compute_capability, "precision": self.precision}


@dataclass(frozen=True)
class EngineInfo:
    """A built engine file and the target it was built for."""

    path: Path
    target: EngineTarget


def _cudart():
    """NVIDIA's CUDA runtime bindings (cuda-python): ``cuda.bindings.runtime`` from 12.6 on,
    ``cuda.cudart`` before."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("cuda-python is not installed (pip install cuda-python matching the CUDA version)")


def _call(cudart, function: str, *args):
    """Call a CUDA runtime function; raise BundleError on an error code, else return its results."""
    result = getattr(cudart, function)(*args)
    error, rest = result[0], result[1:]
    if int(error) != 0:
        raise BundleError(f"CUDA {function} failed: {getattr(error, 'name', error)}")
    return rest[0] if len(rest) == 1 else rest


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when tensorrt and cuda-python import and a CUDA GPU is visible, else (False, why)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed"
    try:
        cudart = _cudart()
    except ImportError as exc:
        return False, str(exc)
    try:
        count = _call(cudart, "cudaGetDeviceCount")
    except BundleError as exc:
        return False, f"no CUDA GPU is usable ({exc})"
    if count < 1:
        return False, "no CUDA GPU is visible"
    return True, ""


def current_target(precision: str = "fp32") -> EngineTarget:
    """This machine's TensorRT version and GPU 0 (needs tensorrt and cuda-python)."""
    import tensorrt as trt

    props = _call(_cudart(), "cudaGetDeviceProperties", 0)
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return EngineTarget(trt.__version__, name, f"{props.major}.{props.minor}", precision)


def build_engine(onnx_path: Path | str, engine_path: Path | str, fp16: bool = False,
                 workspace_mb: int = 1024) -> EngineInfo:
    """Parse the ONNX model and serialise an engine (FP32 unless ``fp16``), written atomically."""
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
    engine_path = Path(engine_path)
    partial = engine_path.with_name(engine_path.name + ".partial")
    partial.write_bytes(bytes(serialized))
    os.replace(partial, engine_path)
    return EngineInfo(engine_path, current_target("fp16" if fp16 else "fp32"))


# --- which engine file may be used -------------------------------------------------------

def engine_record(info: EngineInfo, onnx_sha256: str) -> dict:
    """What a bundle's certificate or a cache entry records about an engine."""
    return {"sha256": sha256_file(info.path), **info.target.record(), "onnx_sha256": onnx_sha256,
            "cache_key": info.target.cache_key(onnx_sha256)}


def record_mismatch(record: dict | None, path: Path, onnx_sha256: str, target: EngineTarget) -> str:
    """Why the engine file at ``path`` with ``record`` must not be used here ("" when it may):
    a missing record, file or hash, another model, TensorRT version, GPU or precision."""
    if not path.is_file():
        return "missing (not built on this machine yet)"
    if not isinstance(record, dict):
        return "no record of what it was built for"
    for key, want in target.record().items():
        have = record.get(key)
        if have != want:
            return f"built for {key} {have!r}, this machine needs {want!r}"
    if record.get("onnx_sha256", onnx_sha256) != onnx_sha256:
        return "built from another ONNX model"
    if record.get("sha256") != sha256_file(path):
        return "its SHA-256 differs from the recorded one (modified or corrupt)"
    return ""


def cached_engine_paths(cache_dir: Path, onnx_sha256: str, target: EngineTarget,
                        input_shape: tuple[int, ...]) -> tuple[Path, Path]:
    """(engine, record) paths of the cache entry for this model on this target, named from
    the cache key (ONNX hash, TensorRT version, GPU, compute capability, precision) and the
    input shape."""
    stem = f"model-{target.cache_key(onnx_sha256)}-{'x'.join(str(d) for d in input_shape)}"
    return cache_dir / f"{stem}.engine", cache_dir / f"{stem}.json"


@dataclass(frozen=True)
class EngineChoice:
    """The engine file to use, and whether it must be (re)built first and why."""

    path: Path
    record_path: Path | None  # where the record of a (re)built engine goes; None: the bundle's own
    build: bool
    reason: str  # why it is built ("" when an existing engine is used as it is)


def choose_engine(bundle, target: EngineTarget, cache_dir: Path, engine_path: Path | str | None = None,
                  force_update: bool = False, onnx_sha256: str | None = None) -> EngineChoice:
    """Which engine serves ``bundle`` on ``target``. An engine file is used only when its
    record (the bundle certificate's ``engine`` for the bundle's file, a ``.json`` beside it
    otherwise) matches this model, this TensorRT, GPU and precision, and the file's hash;
    else it is rebuilt: at ``engine_path`` when given, else in ``cache_dir``. ``onnx_sha256``:
    the model served, when it is not the bundle's (the bundle's engine is then never used)."""
    onnx_sha = onnx_sha256 or bundle.model_sha256
    own_model = onnx_sha == bundle.model_sha256
    if engine_path is not None:
        path = Path(engine_path)
        record_path = path.with_name(path.name + ".json")
        if force_update:
            return EngineChoice(path, record_path, True, "force_engine_update is set")
        record = read_cache_record(record_path)
        if (record is None and own_model and bundle.engine_path is not None
                and bundle.engine_path.resolve() == path.resolve()):
            record = bundle.certificate.get("engine")
        why = record_mismatch(record, path, onnx_sha, target)
        return EngineChoice(path, record_path, bool(why), f"{path}: {why}" if why else "")
    reasons = []
    if force_update:
        reasons.append("force_engine_update is set")
    elif bundle.engine_path is not None and own_model:
        why = record_mismatch(bundle.certificate.get("engine"), bundle.engine_path, onnx_sha, target)
        if not why:
            return EngineChoice(bundle.engine_path, None, False, "")
        reasons.append(f"the bundle's engine: {why}")
    input_shape = (1, 1, bundle.preprocess.input_height, bundle.preprocess.input_width)
    path, record_path = cached_engine_paths(Path(cache_dir), onnx_sha, target, input_shape)
    if not force_update:
        why = record_mismatch(read_cache_record(record_path), path, onnx_sha, target)
        if not why:
            return EngineChoice(path, record_path, False, "")
        reasons.append(f"cache {path.name}: {why}")
    return EngineChoice(path, record_path, True, "; ".join(reasons))


def read_cache_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_cache_record(path: Path, record: dict) -> None:
    write_json_atomic(path, record)


# --- running an engine ------------------------------------------------------------------

class _DeviceBuffer:
    """A block of GPU memory (cudaMalloc) with host copies through one CUDA stream."""

    def __init__(self, cudart, nbytes: int) -> None:
        self.cudart, self.nbytes = cudart, nbytes
        self.pointer = int(_call(cudart, "cudaMalloc", nbytes))

    def upload(self, array: np.ndarray, stream) -> None:
        _call(self.cudart, "cudaMemcpyAsync", self.pointer, array.ctypes.data, array.nbytes,
              self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def download(self, array: np.ndarray, stream) -> None:
        _call(self.cudart, "cudaMemcpyAsync", array.ctypes.data, self.pointer, array.nbytes,
              self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)

    def free(self) -> None:
        if self.pointer:
            self.cudart.cudaFree(self.pointer)
            self.pointer = 0


class TensorRTRunner:
    """Run a serialised engine on float32 batches (N, 1, H, W) -> (N, 2K); torch-free."""

    def __init__(self, engine_path: Path | str) -> None:
        ok, why = tensorrt_available()
        if not ok:
            raise BundleError(f"cannot run a TensorRT engine here: {why}")
        import tensorrt as trt

        self.cudart = _cudart()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BundleError(f"{engine_path}: TensorRT cannot deserialise this engine (built with another "
                              "TensorRT version or for another GPU?); rebuild: 'usn-offline build-engine'")
        if not hasattr(self.engine, "num_io_tensors"):  # pragma: no cover - TensorRT < 8.5
            raise BundleError(f"TensorRT {trt.__version__} is too old (need >= 8.5)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{engine_path}: expected one input and one output tensor, got {names}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = tuple(int(d) for d in self.engine.get_tensor_shape(self.input_name))
        self.output_shape = tuple(int(d) for d in self.engine.get_tensor_shape(self.output_name))
        if min(self.input_shape + self.output_shape) < 1:
            raise BundleError(f"{engine_path}: dynamic shapes are not supported (input {self.input_shape})")
        self.stream = _call(self.cudart, "cudaStreamCreate")
        self._input = _DeviceBuffer(self.cudart, 4 * int(np.prod(self.input_shape)))
        self._output = _DeviceBuffer(self.cudart, 4 * int(np.prod(self.output_shape)))
        self.context.set_tensor_address(self.input_name, self._input.pointer)
        self.context.set_tensor_address(self.output_name, self._output.pointer)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        static = self.input_shape[0]
        if batch.shape[1:] != self.input_shape[1:]:
            raise BundleError(f"TensorRT engine expects inputs {self.input_shape[1:]}, got {batch.shape[1:]}")
        outputs = []
        for start in range(0, len(batch), static):
            chunk = batch[start:start + static]
            padded = np.zeros(self.input_shape, np.float32)
            padded[:len(chunk)] = chunk
            out = np.empty(self.output_shape, np.float32)
            self._input.upload(padded, self.stream)
            if not self.context.execute_async_v3(int(self.stream)):
                raise BundleError("TensorRT inference failed")
            self._output.download(out, self.stream)
            _call(self.cudart, "cudaStreamSynchronize", self.stream)
            outputs.append(out[:len(chunk)].reshape(len(chunk), -1))
        return np.concatenate(outputs)

    def __del__(self) -> None:
        for buffer in (getattr(self, "_input", None), getattr(self, "_output", None)):
            if buffer is not None:
                buffer.free()
