"""Inference backends for exported models (torch-free; each imports its runtime lazily).

Every backend maps a float32 batch (N, 1, H, W) in [0, 1] to (N, 2K) normalised
keypoint coordinates, exactly like the torch model it was exported from.
"""

from __future__ import annotations

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
