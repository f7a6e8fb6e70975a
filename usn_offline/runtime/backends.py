"""Inference backends for exported models (torch-free; each imports its runtime lazily).

Every backend maps a float32 batch (N, 1, H, W) in [0, 1] to (N, 2K) normalised
keypoint coordinates, exactly like the torch model it was exported from.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from usn_offline.errors import BundleError


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU, or CUDA when ``providers`` asks for it and it is present."""

    name = "onnxruntime"

    def __init__(self, model_path: Path | str, providers: list[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BundleError("onnxruntime is not installed (pip install onnxruntime)") from exc
        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BundleError(f"ONNX Runtime providers {missing} not available (have {available})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Worker threads that keep spinning after a run steal the CPU from the next frame's
        # preprocessing and monitor (bench/node_bench.py, rgb8 640x480: callback 1.59 ms with
        # spinning, 1.09-1.16 ms without) and from every other process on a robot's shared
        # CPU; a camera-rate node is idle between frames, so spinning buys little.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=wanted)
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise BundleError(f"{model_path}: ONNX Runtime cannot load the model ({exc})") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{model_path}: expected one input and one output")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_shape = tuple(inputs[0].shape)
        self.providers = self.session.get_providers()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) float32 -> (N, 2K); batches larger than the static batch run in pieces."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        static = self.input_shape[0] if isinstance(self.input_shape[0], int) else None
        if static is None or static == len(batch):
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        parts = [self.session.run([self.output_name], {self.input_name: batch[i:i + static]})[0]
                 for i in range(0, len(batch), static)]
        return np.concatenate(parts)


class TorchBackend:
    """The original checkpoint through torch (imports torch; for comparison and debugging),
    on ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""

    name = "torch"

    def __init__(self, checkpoint_path: Path | str, device: str = "auto") -> None:
        from usn_offline.train.checkpoint import load_checkpoint
        from usn_offline.train.device import resolve_device

        self.device = resolve_device(device)
        self.model, _ = load_checkpoint(checkpoint_path, self.device)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            return self.model(x).cpu().numpy()


class TensorRTBackend:
    """A TensorRT engine: the bundle's, a given file, or one built once from the ONNX model
    and cached under a key of ONNX hash, TensorRT version, GPU and precision."""

    name = "tensorrt"

    def __init__(self, bundle, model_path: Path | str, engine_path: Path | str | None = None,
                 force_update: bool = False, fp16: bool = False) -> None:
        from usn_offline.export.tensorrt_engine import TensorRTRunner, build_engine, tensorrt_available

        try:
            ok, why = tensorrt_available()
        except ImportError as exc:  # e.g. its CUDA buffers come from torch, absent on this robot
            raise BundleError(f"backend tensorrt is not available here: {exc}") from exc
        if not ok:
            raise BundleError(f"backend tensorrt is not available here: {why}")
        import tensorrt as trt

        from usn_offline.export.tensorrt_engine import EngineInfo, _gpu

        if engine_path is None and bundle.engine_path is not None and not force_update:
            engine_path = bundle.engine_path
        if engine_path is None:
            gpu, capability = _gpu()
            key = EngineInfo(Path(), trt.__version__, gpu, capability, "fp16" if fp16 else "fp32").cache_key(
                bundle.model_sha256)
            engine_path = Path.home() / ".cache" / "usn_keypoints" / f"model-{key}.engine"
        engine_path = Path(engine_path)
        if force_update or not engine_path.is_file():
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            build_engine(model_path, engine_path, fp16)
        self.runner = TensorRTRunner(engine_path)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.infer(batch)


def create_backend(kind: str, bundle, model_path: Path | str | None = None, engine_path: Path | str | None = None,
                   force_engine_update: bool = False, fp16: bool = False,
                   checkpoint_path: Path | str | None = None):
    """``auto``: TensorRT when it and a GPU are present, else ONNX Runtime (CUDA provider
    when available, else CPU)."""
    model_path = model_path or bundle.onnx_path
    if kind == "torch":
        if not checkpoint_path:
            raise BundleError("backend torch needs checkpoint_path (the bundle holds no torch model)")
        return TorchBackend(checkpoint_path)
    if kind in ("tensorrt", "auto"):
        # Without the tensorrt package, do not touch the TensorRT code at all: its builder
        # lives with the (torch) export stage, which a robot without torch cannot import.
        if importlib.util.find_spec("tensorrt") is None:
            if kind == "tensorrt":
                raise BundleError("backend tensorrt is not available here: the tensorrt Python package is not "
                                  "installed")
        else:
            try:
                return TensorRTBackend(bundle, model_path, engine_path, force_engine_update, fp16)
            except BundleError:
                if kind == "tensorrt":
                    raise
    if kind not in ("onnxruntime", "auto", "tensorrt"):
        raise BundleError(f"unknown backend '{kind}' (auto, tensorrt, onnxruntime, torch)")
    try:
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
            if "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
    except ImportError:
        providers = None
    return OnnxRuntimeBackend(model_path, providers)
