"""One frame in, keypoints and a certification status out (torch-free).

The ROS node and the rosbag replay share this pipeline, so preprocessing, inference and
the decision exist once. Every frame yields exactly one :class:`FrameResult`; a frame
that cannot be processed, or whose network output cannot be keypoints (the wrong size,
not finite), yields keypoints=None and the BAD_INPUT reason, never an exception.

The decision: a frame is certified only when a per-frame proof (a :class:`FrameVerifier`,
``usn_offline.certify.frame.FrameCertifier``, which needs torch: in-process in the replay,
in a child process in the node, ``runtime.proof_process.ProofProcess``) shows that its
keypoints hold for every lighting change of the stated range. A frame whose contrast no
change of that range can give a scene of the assumed contrast (a :class:`SceneContrastCheck`)
is flagged OUT_OF_REGION without a proof. The photometric monitor's (a, b) estimate is
diagnostic output; with ``monitor_veto`` its flags also withhold certification (never
grant it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.monitor import MonitorResult, PhotometricMonitor, Reason, clipped_shares, mean_and_std
from usn_offline.runtime.preprocess import full_scale, normalised_to_pixels, preprocess
from usn_offline.runtime.scene_check import SceneContrastCheck


class Backend(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


class Proof(Protocol):
    certified: bool
    deviation_px: float
    detail: str


class FrameVerifier(Protocol):
    def prove(self, frame: np.ndarray, keypoints_normalised: np.ndarray) -> Proof: ...


@dataclass
class FrameResult:
    keypoints_px: np.ndarray | None  # (K, 2) in pixels of the input frame
    status: MonitorResult
    seconds: dict[str, float] = field(default_factory=dict)
    frame: np.ndarray | None = field(default=None, repr=False)  # the decoded frame, when there was one
    # (frame, network output, frame index, scene-check finding) while the decision is
    # pending (KeypointPipeline.finish)
    pending: tuple | None = field(default=None, repr=False)

    @property
    def certified(self) -> bool:
        return self.keypoints_px is not None and self.pending is None and self.status.certified


# Normalised keypoint coordinates span the image as [-1, 1]: beyond this, an output is no
# position at all (it would not even fit a float32 message field in pixels).
MAX_ABS_NORMALISED = 1e4


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
    verifier: FrameVerifier | None = None
    prove_every: int = 1  # prove every n-th frame; the others are NOT_CHECKED
    monitor_veto: bool = False
    scene_check: SceneContrastCheck | None = None
    mismatch_detail: str = "certificate does not match the model"  # the detail of CERTIFICATE_MISMATCH
    frames_seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.prove_every < 1:
            raise ValueError(f"prove_every must be >= 1, got {self.prove_every}")

    def _decide(self, frame: np.ndarray, output: np.ndarray, status: MonitorResult, index: int, busy: bool,
                outside: str | None = None) -> MonitorResult:
        """Replace the monitor's flags by the per-frame decision (keeping them as
        diagnostics, and as reasons with ``monitor_veto``); ``outside``: why the scene
        check found the frame outside the lighting range (then nothing is proved)."""
        reasons = list(status.reasons) if self.monitor_veto else []
        details = [status.detail] if self.monitor_veto and status.detail else []
        status.scene_finding = outside
        if outside is not None:
            if Reason.OUT_OF_REGION not in reasons:
                reasons.append(Reason.OUT_OF_REGION)
            details.append(outside)
        elif self.verifier is None:
            reasons.append(Reason.NOT_CHECKED)
            details.append("no per-frame verifier (needs torch; node parameter frame_proof)")
        elif index % self.prove_every:
            reasons.append(Reason.NOT_CHECKED)
            details.append(f"not proved: proving every {self.prove_every}th frame")
        elif busy:
            reasons.append(Reason.NOT_CHECKED)
            details.append("not proved: the prover was busy with an earlier frame")
        else:
            try:
                proof = self.verifier.prove(frame, output.reshape(-1))
            except Exception as exc:  # a bad frame never stops the node: say what failed
                reasons.append(Reason.NOT_PROVED)
                details.append(f"verifier error: {type(exc).__name__}: {exc}")
            else:
                if proof.certified:
                    status.proven_deviation_px = float(proof.deviation_px)
                else:
                    reasons.append(Reason.NOT_PROVED)
                    details.append(proof.detail)
        if not self.monitor_veto and status.detail:
            details.append(f"monitor (diagnostic): {status.detail}")
        status.reasons = reasons
        status.detail = "; ".join(filter(None, details))
        return status

    def _check_output(self, out: np.ndarray) -> str | None:
        """Why the network's output cannot be served (nothing is published from it), or None:
        its size must be 2 per keypoint name, its values finite and no farther than
        ``MAX_ABS_NORMALISED`` image sizes off the image (a model that disagrees with its
        manifest, or a broken engine)."""
        expected = 2 * len(self.bundle.keypoint_names)
        if out.size != expected:
            return f"the network gave {out.size} values, not {expected} (2 per keypoint name of the manifest)"
        peak = float(np.abs(out).max())  # one pass on every frame; NaN fails the comparison
        if peak <= MAX_ABS_NORMALISED:
            return None
        if not np.isfinite(peak):
            return "the network's output is not finite (NaN or infinite keypoints)"
        return f"the network's output {peak:.3g} is far off the image (normalised coordinates)"

    def process(self, frame: np.ndarray, prove: str = "now") -> FrameResult:
        """Keypoints and the decision for one frame. ``prove``: "now" (prove before
        returning), "busy" (a prover is occupied: NOT_CHECKED) or "later" (return at once
        with the decision pending; :meth:`finish` completes it, e.g. on a worker thread,
        so a slow proof never holds back the keypoints or the next frame)."""
        if prove not in ("now", "busy", "later"):
            raise ValueError(f"prove must be 'now', 'busy' or 'later', got {prove!r}")
        t0 = time.perf_counter()
        problem = check_frame(frame, self.max_pixels)
        if problem is not None:
            return FrameResult(None, bad_input(problem), {"total": time.perf_counter() - t0})
        image = preprocess(frame, self.bundle.preprocess)
        # Right after the preprocessing, while the frame is still in the CPU's cache: after
        # inference, this second pass over it read the frame back from memory (measured
        # 0.16 -> 0.08 ms for this step and the monitor's at 640x480 rgb8). The scene check
        # weighs the black and blown shares counted here too.
        clipped, black, blown = clipped_shares(frame, full_scale(frame.dtype))
        t1 = time.perf_counter()
        out = np.asarray(self.backend.infer(np.ascontiguousarray(image[None, None], dtype=np.float32)))
        t2 = time.perf_counter()
        problem = self._check_output(out)
        if problem is not None:
            return FrameResult(None, bad_input(problem), {"preprocess": t1 - t0, "inference": t2 - t1,
                                                          "total": time.perf_counter() - t0})
        # Normalised coordinates span any image's edges: straight to the frame's pixels.
        keypoints = normalised_to_pixels(out.reshape(-1, 2), *frame.shape[:2])
        mean, spread = mean_and_std(image)
        status = self.monitor.assess(image, clipped, spread, mean)
        outside = (self.scene_check.check(frame, image, clipped, spread, (black, blown))
                   if self.scene_check is not None else None)
        t3 = time.perf_counter()
        index = self.frames_seen
        self.frames_seen += 1
        result = FrameResult(keypoints, status, {"preprocess": t1 - t0, "inference": t2 - t1, "monitor": t3 - t2})
        result.pending = (frame, out, index, outside)
        if prove == "later" and outside is None:  # a frame outside the range needs no proof
            return result
        self.finish(result, busy=prove == "busy")
        result.seconds["total"] = time.perf_counter() - t0
        return result

    def finish(self, result: FrameResult, busy: bool = False) -> FrameResult:
        """Complete the pending decision of a frame from :meth:`process`."""
        if result.pending is None:
            raise ValueError("this frame's decision is not pending")
        started = time.perf_counter()
        frame, out, index, outside = result.pending
        result.pending = None
        status = self._decide(frame, out, result.status, index, busy, outside)
        if not self.certificate_matches:
            status.reasons.append(Reason.CERTIFICATE_MISMATCH)
            status.detail = "; ".join(filter(None, [status.detail, self.mismatch_detail]))
        result.seconds["proof"] = time.perf_counter() - started
        return result
