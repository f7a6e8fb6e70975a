"""One frame in, keypoints and a certification status out (torch-free).

The ROS node and the rosbag replay share this pipeline, so preprocessing, inference and
the monitor exist once. Every frame yields exactly one :class:`FrameResult`; a frame
that cannot be processed yields keypoints=None and the BAD_INPUT reason, never an
exception.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.monitor import MonitorResult, PhotometricMonitor, Reason, saturated_fraction
from usn_offline.runtime.preprocess import normalised_to_pixels, preprocess, scale_keypoints


class Backend(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class FrameResult:
    keypoints_px: np.ndarray | None  # (K, 2) in pixels of the input frame
    status: MonitorResult
    seconds: dict[str, float] = field(default_factory=dict)
    frame: np.ndarray | None = field(default=None, repr=False)  # the decoded frame, when there was one

    @property
    def certified(self) -> bool:
        return self.keypoints_px is not None and self.status.certified


def bad_input(detail: str) -> MonitorResult:
    nan = float("nan")
    return MonitorResult(nan, nan, nan, nan, nan, nan, [Reason.BAD_INPUT], detail)


def check_frame(frame: np.ndarray, max_pixels: int) -> str | None:
    """Why ``frame`` cannot be processed, or None."""
    if not isinstance(frame, np.ndarray):
        return f"frame is a {type(frame).__name__}, not an array"
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)):
        return f"unsupported frame shape {frame.shape}"
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        return f"empty frame ({frame.shape[0]}x{frame.shape[1]})"
    if frame.shape[0] * frame.shape[1] > max_pixels:
        return f"frame of {frame.shape[1]}x{frame.shape[0]} exceeds the limit of {max_pixels} pixels"
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        return "frame contains NaN or infinite values"
    if frame.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        return f"unsupported pixel type {frame.dtype}"
    return None


@dataclass
class KeypointPipeline:
    """Preprocess with the bundle's parameters, infer, map keypoints back, monitor."""

    bundle: Bundle
    backend: Backend
    monitor: PhotometricMonitor
    certificate_matches: bool = True  # False: serve, but flag every frame CERTIFICATE_MISMATCH
    max_pixels: int = 4096 * 4096

    def process(self, frame: np.ndarray) -> FrameResult:
        t0 = time.perf_counter()
        problem = check_frame(frame, self.max_pixels)
        if problem is not None:
            return FrameResult(None, bad_input(problem), {"total": time.perf_counter() - t0})
        max_value = 255.0 if frame.dtype == np.uint8 else 65535.0 if frame.dtype == np.uint16 else 1.0
        image = preprocess(frame, self.bundle.preprocess)
        t1 = time.perf_counter()
        out = np.asarray(self.backend.infer(image[None, None].astype(np.float32)))
        t2 = time.perf_counter()
        h, w = self.bundle.preprocess.input_height, self.bundle.preprocess.input_width
        net_px = normalised_to_pixels(out.reshape(-1, 2), h, w)
        keypoints = scale_keypoints(net_px, (h, w), frame.shape[:2])
        status = self.monitor.assess(image, saturated_fraction(frame, max_value))
        if not self.certificate_matches:
            status.reasons.append(Reason.CERTIFICATE_MISMATCH)
            status.detail = "; ".join(filter(None, [status.detail, "certificate does not match the model"]))
        t3 = time.perf_counter()
        return FrameResult(keypoints, status, {"preprocess": t1 - t0, "inference": t2 - t1,
                                               "monitor": t3 - t2, "total": t3 - t0})
