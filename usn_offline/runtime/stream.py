"""One camera stream, frame by frame: decode, the shared pipeline, start-up calibration
(torch-free, ROS-free).

This is the node's whole per-frame behaviour, so the ROS node and the rosbag replay run
exactly the same code on the same bytes: the node hands over the fields of each
``sensor_msgs/Image`` or ``CompressedImage``, the replay the same fields read from a bag.
Every call returns one :class:`FrameResult` and never raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from usn_offline.errors import ConfigError
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.image_decode import ImageDecodeError, decode_compressed, decode_image
from usn_offline.runtime.monitor import PhotometricMonitor, Reason, nominal_from_images
from usn_offline.runtime.pipeline import FrameResult, FrameVerifier, KeypointPipeline, bad_input
from usn_offline.runtime.preprocess import preprocess
from usn_offline.runtime.scene_check import make_scene_check


@dataclass
class FrameStream:
    """Frames of one stream in, one :class:`FrameResult` each out.

    ``calibration_frames`` > 0: the first frames that carry contrast (not flat, e.g. not a
    lens cap) are taken as the scene under nominal light and replace the monitor's nominal
    statistics; they are reported UNCERTAIN_ESTIMATE meanwhile.
    """

    pipeline: KeypointPipeline
    calibration_frames: int = 0
    _calibration: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def calibrating(self) -> bool:
        return len(self._calibration) < self.calibration_frames

    def process_raw(self, height: int, width: int, encoding: str, is_bigendian: bool, step: int,
                    data: bytes | bytearray | memoryview, prove: str = "now") -> FrameResult:
        """A ``sensor_msgs/Image`` payload (``prove``: see :meth:`KeypointPipeline.process`)."""
        started = time.perf_counter()
        try:
            frame = decode_image(height, width, encoding, is_bigendian, step, data, self.pipeline.max_pixels)
        except ImageDecodeError as exc:
            return _failed(str(exc), started)
        except Exception as exc:  # a frame never takes the stream down
            return _failed(f"internal error: {type(exc).__name__}: {exc}", started)
        return self._process(frame, started, prove)

    def process_compressed(self, format_: str, data: bytes | bytearray | memoryview, prove: str = "now"
                           ) -> FrameResult:
        """A ``sensor_msgs/CompressedImage`` payload (JPEG, PNG, ...)."""
        started = time.perf_counter()
        try:
            frame = decode_compressed(format_, data, self.pipeline.max_pixels)
        except ImageDecodeError as exc:
            return _failed(str(exc), started)
        except Exception as exc:
            return _failed(f"internal error: {type(exc).__name__}: {exc}", started)
        return self._process(frame, started, prove)

    def process_frame(self, frame: np.ndarray, prove: str = "now") -> FrameResult:
        """An already decoded frame (mono or RGB(A), uint8/uint16/float)."""
        return self._process(frame, time.perf_counter(), prove)

    def _process(self, frame: np.ndarray, started: float, prove: str = "now") -> FrameResult:
        decoded = time.perf_counter()
        try:
            result = self.pipeline.process(frame, prove)
            if result.keypoints_px is not None and self.calibrating:
                self._calibrate(frame, result)
        except Exception as exc:
            result = FrameResult(None, bad_input(f"internal error: {type(exc).__name__}: {exc}"))
        result.frame = frame
        result.seconds["decode"] = decoded - started
        result.seconds["total"] = time.perf_counter() - started
        return result

    def _calibrate(self, frame: np.ndarray, result: FrameResult) -> None:
        image = preprocess(frame, self.pipeline.bundle.preprocess)
        monitor = self.pipeline.monitor
        if float(image.std()) >= monitor.min_std:  # a flat frame (lens cap, darkness) is not nominal light
            self._calibration.append(image)
        left = self.calibration_frames - len(self._calibration)
        if self.pipeline.monitor_veto:
            # The estimate means nothing before calibration: it withholds certification
            # until then; what was measured or proved on the frame stays.
            estimated = (Reason.UNCERTAIN_ESTIMATE,) + (() if result.status.scene_finding else (Reason.OUT_OF_REGION,))
            result.status.reasons = [Reason.UNCERTAIN_ESTIMATE] + [
                r for r in result.status.reasons if r not in estimated]
        if left == 0:
            monitor.nominal = nominal_from_images(np.stack(self._calibration))
            note = f"monitor calibrated on {len(self._calibration)} frames"
        else:
            note = f"calibrating the monitor on nominal frames ({left} left)"
        result.status.detail = "; ".join(filter(None, [note, result.status.detail]))


def _failed(detail: str, started: float) -> FrameResult:
    seconds = time.perf_counter() - started
    return FrameResult(None, bad_input(detail), {"decode": seconds, "total": seconds})


@dataclass(frozen=True)
class StreamSettings:
    """The node parameters that decide what each frame gets (the rest is ROS plumbing).
    Defaults are those of the runtime classes, which the node declares too."""

    backend: str = "auto"
    monitor_z: float = 2.0
    monitor_max_saturated_fraction: float = 0.05
    monitor_calibration_frames: int = 0
    max_image_pixels: int = 4096 * 4096
    frame_proof: bool = True
    frame_proof_max_boxes: int = 16
    frame_proof_every: int = 1
    # (contrast min, max, brightness min, max) the proofs cover; all zero: the certificate's box
    frame_proof_lighting: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    monitor_veto: bool = False
    scene_check: bool = True
    # (min, max) network-input std of the scenes under nominal light; zeros: the bundle's
    # training images' 1st-99th percentile
    scene_std_range: tuple[float, ...] = (0.0, 0.0)

    @classmethod
    def from_params_file(cls, path: Path | str, node_name: str = "usn_keypoint_node") -> StreamSettings:
        """Read a ROS 2 parameters YAML (``<node>: ros__parameters: {...}``, or ``/**``)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"parameters file not found: {path}")
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        section = next((doc[key] for key in (node_name, f"/{node_name}", "/**") if isinstance(doc, dict)
                        and isinstance(doc.get(key), dict)), None)
        params = section.get("ros__parameters") if section else None
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: no '{node_name}: ros__parameters:' section")
        from usn_offline.runtime.node_parameters import PARAMETERS, check_value, unknown_parameters

        unknown = unknown_parameters(params)
        if unknown:
            raise ConfigError(f"{path}: unknown parameter {', '.join(unknown)}")
        values = {}
        for f in fields(cls):
            if f.name not in params:
                continue
            kind, value = type(f.default), params[f.name]
            if kind is tuple:
                if not (isinstance(value, list) and len(value) == len(f.default) and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                    raise ConfigError(f"{path}: parameter {f.name} must be a list of {len(f.default)} numbers, "
                                      f"got {value!r}")
                values[f.name] = tuple(float(v) for v in value)
                continue
            accepted = (int, float) if kind is float else kind  # YAML writes 2.0 as 2 too
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
                raise ConfigError(f"{path}: parameter {f.name} must be a {kind.__name__}, got {value!r}")
            values[f.name] = kind(value)
        for spec in PARAMETERS:  # the node's ranges and choices, for every parameter the file sets
            problem = check_value(spec, params[spec.name]) if spec.name in params else None
            if problem is not None:
                raise ConfigError(f"{path}: {problem}")
        return cls(**values)

    def open(self, bundle: Bundle, backend=None, verifier: FrameVerifier | None = None) -> FrameStream:
        """A stream serving ``bundle`` as the node would with these settings (``backend``:
        an already created backend to share, else one made from ``self.backend``;
        ``verifier``: the per-frame prover, which the caller makes when ``frame_proof`` is
        set and torch is there, see ``usn_offline.certify.frame.FrameCertifier.for_bundle``)."""
        from usn_offline.runtime.backends import create_backend, deployed_bundle

        backend = backend or create_backend(self.backend, bundle)
        bundle = deployed_bundle(bundle, backend)
        monitor = PhotometricMonitor(bundle.region, bundle.nominal, self.monitor_z,
                                     self.monitor_max_saturated_fraction)
        scene = make_scene_check(bundle, self.scene_check, bundle.lighting_range(self.frame_proof_lighting),
                                 self.scene_std_range)
        pipeline = KeypointPipeline(bundle, backend, monitor, max_pixels=self.max_image_pixels,
                                    verifier=verifier if self.frame_proof else None,
                                    prove_every=self.frame_proof_every, monitor_veto=self.monitor_veto,
                                    scene_check=scene)
        return FrameStream(pipeline, self.monitor_calibration_frames)
