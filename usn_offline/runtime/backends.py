"""Inference backends for exported models (torch-free; each imports its runtime lazily).

Every backend maps a float32 batch (N, 1, H, W) in [0, 1] to (N, 2K) normalised
keypoint coordinates, exactly like the torch model it was exported from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from usn_offline.errors import BundleError
from usn_offline.resources import usable_cores
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.preprocess import normalised_to_pixels

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU, or CUDA when ``providers`` asks for it and it is present."""

    name = "onnxruntime"

    def __init__(self, model_path: Path | str, providers: list[str] | None = None,
                 expected_sha256: str | None = None) -> None:
        """``expected_sha256``: the model's hash as the bundle records it. The session is made
        from the bytes that were hashed, so the model served is the model checked (the file
        cannot change in between), and a model whose weights sit in external data files
        (which no hash covers) does not load."""
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
        # As many threads as the cores this process may use, set explicitly: left at its
        # default, ONNX Runtime pins each worker thread to one core, which then cannot move
        # away from a core the proof process (or a camera driver) occupies. Measured with
        # bench/node_bench.py, shipped parameters, rgb8 640x480: pinned, 3 of 8 runs
        # doubled the callback's overhead (0.94-1.18 ms against 0.45-0.55); unpinned,
        # none of 7 (0.44-0.66 ms).
        options.intra_op_num_threads = usable_cores()
        try:
            model = Path(model_path).read_bytes()
        except OSError as exc:
            raise BundleError(f"{model_path}: cannot read the model ({exc.strerror or exc})") from exc
        self.model_sha256 = hashlib.sha256(model).hexdigest()
        if expected_sha256 is not None and self.model_sha256 != expected_sha256:
            raise BundleError(f"{model_path}: SHA-256 {self.model_sha256[:12]}... is not the bundle's "
                              f"{expected_sha256[:12]}... (the file changed after the bundle was checked)")
        try:
            self.session = ort.InferenceSession(model, options, providers=wanted)
        except Exception as exc:  # ORT raises its own exception types for bad models
            detail = " ".join(str(exc).split())[:300]
            raise BundleError(f"{model_path}: ONNX Runtime cannot load the model ({detail})") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{model_path}: expected one input and one output")
        if inputs[0].type != "tensor(float)" or outputs[0].type != "tensor(float)":
            raise BundleError(f"{model_path}: input {inputs[0].type} and output {outputs[0].type}, expected "
                              "tensor(float) for both")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_shape = tuple(inputs[0].shape)
        self.output_shape = tuple(outputs[0].shape)
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

    def __init__(self, checkpoint_path: Path | str, device: str = "auto", expected_sha256: str | None = None
                 ) -> None:
        """``expected_sha256``: the checkpoint's hash as the certificate records it (None: any
        checkpoint, served uncertified by the caller's policy)."""
        from usn_offline.runtime.hashing import sha256_file
        from usn_offline.train.checkpoint import load_checkpoint
        from usn_offline.train.device import resolve_device

        if expected_sha256 is not None and sha256_file(checkpoint_path) != expected_sha256:
            raise BundleError(f"checkpoint_path {checkpoint_path} is not the checkpoint the certificate was issued "
                              "for (SHA-256 mismatch)")
        self.device = resolve_device(device)
        self.model, _ = load_checkpoint(checkpoint_path, self.device)
        # Set by create_backend: torch on this machine (TF32 on a GPU, another BLAS) is
        # measured against the bundle's model like an engine built here.
        self.deployment_gap_px: float | None = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            return self.model(x).cpu().numpy()


def engine_cache_dir() -> Path:
    """Where engines built on this machine are cached ($XDG_CACHE_HOME/usn_keypoints)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "usn_keypoints"


def gap_probe_images(height: int, width: int, count: int) -> np.ndarray:
    """(count, 1, H, W) float32 inputs an engine is compared on: half uniform noise, half
    scene-like (flat regions of several sizes with edges between them, a gradient, and
    pixels clipped to 0 and 1 as over- and underexposed parts of a frame are), so that a
    reduced-precision engine meets the smooth inputs of real frames too, not noise alone."""
    rng = np.random.default_rng(0)
    noise = rng.random((count - count // 2, 1, height, width), dtype=np.float32)
    scenes = []
    for k in range(count // 2):
        cell = (2, 4, 8, 16)[k % 4]
        blocks = rng.random((-(-height // cell), -(-width // cell)))
        flat = np.kron(blocks, np.ones((cell, cell)))[:height, :width]
        ramp = np.linspace(-0.3, 0.3, width)[None, :] * rng.uniform(-1, 1)
        scene = np.clip(1.4 * (flat + ramp) - 0.2, 0.0, 1.0)  # ~15 % of the pixels clipped
        scenes.append(scene.astype(np.float32)[None])
    return np.concatenate([noise, np.stack(scenes)]) if scenes else noise


def engine_gap_px(bundle, infer, count: int = 64) -> float:
    """Deviation of an engine (``infer``) from the torch model, bounded without torch on the
    target: gap(ONNX Runtime vs torch, recorded at export) + max |engine - ONNX Runtime| on
    :func:`gap_probe_images`."""
    h, w = bundle.preprocess.input_height, bundle.preprocess.input_width
    x = gap_probe_images(h, w, count)
    ort_out = OnnxRuntimeBackend(bundle.onnx_path).infer(x).reshape(count, -1, 2)
    engine_out = np.asarray(infer(x)).reshape(count, -1, 2)
    diff = np.abs(normalised_to_pixels(engine_out, h, w) - normalised_to_pixels(ort_out, h, w)).max()
    return bundle.certificate["deployment_gap_by_backend_px"]["onnxruntime"] + float(diff)


class TensorRTBackend:
    """A TensorRT engine: the bundle's when it was built for this TensorRT, GPU and precision
    (and its hash matches), else one built here once and cached, keyed by ONNX hash,
    TensorRT version, GPU, compute capability, precision and input shape, with a record
    beside it that is checked the same way (runtime/tensorrt_engine.py, choose_engine).

    ``deployment_gap_px``: the deviation from the model of an engine that is not the
    bundle's own, measured at every start against ONNX Runtime (None for the bundle's own
    engine, whose gap the certificate holds)."""

    name = "tensorrt"

    def __init__(self, bundle, model_path: Path | str | None = None, engine_path: Path | str | None = None,
                 force_update: bool = False, fp16: bool = False, gap_tolerance_px: float = 0.05) -> None:
        from usn_offline.runtime.tensorrt_engine import (
            TensorRTRunner,
            build_engine,
            choose_engine,
            current_target,
            engine_record,
            tensorrt_available,
            write_cache_record,
        )

        ok, why = tensorrt_available()
        if not ok:
            raise BundleError(f"backend tensorrt is not available here: {why}")
        from usn_offline.runtime.hashing import sha256_file

        model_path = Path(model_path or bundle.onnx_path)
        onnx_sha = bundle.model_sha256 if model_path == bundle.onnx_path else sha256_file(model_path)
        choice = choose_engine(bundle, current_target("fp16" if fp16 else "fp32"), engine_cache_dir(),
                               engine_path, force_update, onnx_sha)
        info = None
        if choice.build:
            log.warning("building a TensorRT engine at %s (%s)", choice.path, choice.reason)
            choice.path.parent.mkdir(parents=True, exist_ok=True)
            info = build_engine(model_path, choice.path, fp16)
        self.runner = TensorRTRunner(choice.path)
        self.engine_path, self.deployment_gap_px = choice.path, None
        if choice.record_path is None:  # the bundle's own engine: its gap is in the certificate
            return
        gap = engine_gap_px(bundle, self.runner.infer)
        if gap > gap_tolerance_px:
            if info is not None:
                choice.path.unlink(missing_ok=True)
            raise BundleError(f"the TensorRT engine {choice.path} deviates up to {gap:.4f} px from the model, more "
                              f"than {gap_tolerance_px} px: not used (try without fp16)")
        if info is not None:
            write_cache_record(choice.record_path, engine_record(info, onnx_sha))
        self.deployment_gap_px = gap

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.infer(batch)


def deployed_bundle(bundle: Bundle, backend) -> Bundle:
    """``bundle`` as served by ``backend``: its deployment gap raised to the backend's own
    measured gap (an engine built on this machine), so δ + gap stays what the frames get."""
    gap = getattr(backend, "deployment_gap_px", None)
    if gap is None or gap <= bundle.deployment_gap_px:
        return bundle
    return dataclasses.replace(bundle, deployment_gap_px=float(gap))


def check_model_shapes(bundle: Bundle, input_shape: tuple, output_shape: tuple, model: str) -> None:
    """The manifest's runtime fields must describe the model: input (N, 1, H, W) with the
    manifest's H and W, output (N, 2K) for its K keypoint names."""
    h, w, k = bundle.preprocess.input_height, bundle.preprocess.input_width, len(bundle.keypoint_names)
    # A dimension that is not a fixed size (a name in ONNX, -1 in TensorRT) is dynamic.
    dims = [d if isinstance(d, int) and d >= 0 else None for d in input_shape]
    if len(dims) != 4 or dims[1] not in (1, None) or dims[2:] != [h, w]:
        raise BundleError(f"{model}: input shape {list(input_shape)} does not match the manifest's preprocessing "
                          f"(N, 1, {h}, {w})")
    if dims[0] not in (1, None):  # the node serves one frame at a time
        raise BundleError(f"{model}: input batch size {dims[0]}, expected 1 or dynamic")
    out = output_shape[-1] if output_shape else None
    if len(output_shape) != 2 or (isinstance(out, int) and out != 2 * k):
        raise BundleError(f"{model}: output shape {list(output_shape)} does not match the manifest's {k} keypoint "
                          f"names (N, {2 * k})")


def create_backend(kind: str, bundle, model_path: Path | str | None = None, engine_path: Path | str | None = None,
                   force_engine_update: bool = False, fp16: bool = False,
                   checkpoint_path: Path | str | None = None, expected_sha256: str | None = None,
                   any_checkpoint: bool = False):
    """``auto``: TensorRT when it and a GPU are present, else ONNX Runtime (CUDA provider
    when available, else CPU). ``expected_sha256``: the hash the served ONNX model must have
    (default: the bundle's, when ``model_path`` is the bundle's model). ``torch`` serves
    ``checkpoint_path``, which must be the checkpoint the certificate names unless
    ``any_checkpoint`` (the caller then flags every frame), its gap to the bundle's model
    measured here."""
    model_path = model_path or bundle.onnx_path
    if expected_sha256 is None and Path(model_path) == Path(bundle.onnx_path):
        expected_sha256 = bundle.model_sha256
    if kind == "torch":
        if not checkpoint_path:
            raise BundleError("backend torch needs checkpoint_path (the bundle holds no torch model)")
        recorded = bundle.certificate.get("checkpoint_sha256")
        if not any_checkpoint and not isinstance(recorded, str):
            raise BundleError("backend torch: the certificate names no checkpoint to check checkpoint_path against")
        backend = TorchBackend(checkpoint_path, expected_sha256=None if any_checkpoint else recorded)
        backend.deployment_gap_px = engine_gap_px(bundle, backend.infer)
        return backend
    if kind in ("tensorrt", "auto"):
        # Without the tensorrt package, do not touch the TensorRT code at all: its builder
        # lives with the (torch) export stage, which a robot without torch cannot import.
        if importlib.util.find_spec("tensorrt") is None:
            if kind == "tensorrt":
                raise BundleError("backend tensorrt is not available here: the tensorrt Python package is not "
                                  "installed")
        else:
            try:
                backend = TensorRTBackend(bundle, model_path, engine_path, force_engine_update, fp16)
                check_model_shapes(bundle, backend.runner.input_shape, backend.runner.output_shape,
                                   str(backend.engine_path))
                return backend
            except BundleError as exc:
                if kind == "tensorrt":
                    raise
                log.warning("TensorRT not used, serving with ONNX Runtime: %s", exc)
    if kind not in ("onnxruntime", "auto", "tensorrt"):
        raise BundleError(f"unknown backend '{kind}' (auto, tensorrt, onnxruntime, torch)")
    try:
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
            if "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
    except ImportError:
        providers = None
    backend = OnnxRuntimeBackend(model_path, providers, expected_sha256=expected_sha256)
    check_model_shapes(bundle, backend.input_shape, backend.output_shape, str(model_path))
    return backend
