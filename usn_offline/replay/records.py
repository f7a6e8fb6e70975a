"""Per-frame records of a replay and the safety figures computed from them.

Definitions (every figure is per scenario and overall; ``flagged`` = not certified):

- ``moved``: some keypoint on the frame deviates from the detector's output on the
  frame's nominal image (same view, contrast 1, brightness 0) by more than the bound the
  certificate promises, measured in the certificate's norm on the network input and
  reported in image pixels (per axis the bound is delta * W / w and delta * H / h);
- ``silent_failures``: certified frames that moved; ``silent_failure_rate`` = silent
  failures / certified frames. Split by the frame's true lighting: ``..._in_range`` (its
  true (a, b) lies in the certified region, the range the per-frame proofs cover: the
  promise itself broken, which soundness rules out) and ``..._outside_range`` (the stated
  assumption violated: the proof covered a range the true change was not in);
- ``certified_fraction_in_range``: certified frames among the judged frames whose true
  lighting lies in the range;
- ``failure_recall``: flagged frames among those that moved;
- ``false_alarm_rate``: flagged frames among those whose true (a, b) lies in the certified
  region and that did not move.

Frames made malformed on purpose have no keypoints and count only as bad input.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from usn_offline.perturb import PhotometricBox
from usn_offline.replay.bag_reader import BagTruth
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.monitor import Reason
from usn_offline.runtime.pipeline import FrameResult


@dataclass(slots=True)  # a long bag keeps one per frame: ~0.5 KB each
class FrameRecord:
    index: int  # position among the bag's images
    stamp_ns: int
    certified: bool
    reasons: tuple[str, ...]
    contrast: float | None  # the monitor's estimates (None when it has none)
    brightness: float | None
    margin: float | None
    latency_ms: float
    keypoints: tuple[tuple[float, float], ...] | None  # (K, 2) pixels of the frame
    width: int | None = None
    height: int | None = None
    # Ground truth (None for bags without it)
    scenario: str | None = None
    true_contrast: float | None = None
    true_brightness: float | None = None
    malformed: bool | None = None
    in_region: bool | None = None
    deviation_px: float | None = None  # largest keypoint deviation from the nominal output, image px
    deviation_ratio: float | None = None  # the same in units of the certified bound (> 1: moved)
    moved: bool | None = None
    error_px: float | None = None  # mean distance to the true keypoints, image px

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def frame_record(index: int, stamp_ns: int, result: FrameResult, latency_s: float) -> FrameRecord:
    status = result.status
    frame = result.frame
    return FrameRecord(
        index=index, stamp_ns=stamp_ns, certified=result.certified,
        reasons=tuple(r.name for r in status.reasons),
        contrast=_finite(status.contrast), brightness=_finite(status.brightness), margin=_finite(status.margin),
        latency_ms=1e3 * latency_s,
        keypoints=None if result.keypoints_px is None else tuple(map(tuple, result.keypoints_px.tolist())),
        width=None if frame is None else int(frame.shape[1]), height=None if frame is None else int(frame.shape[0]))


def deviation(keypoints: np.ndarray, nominal: np.ndarray, frame_hw: tuple[int, int], bundle: Bundle
              ) -> tuple[float, float]:
    """(largest deviation in image pixels, the same in units of the certified bound).

    The certificate bounds each coordinate (linf) or each keypoint (l2) in network-input
    pixels, so image-pixel differences are scaled to the network input before comparing."""
    h, w = bundle.preprocess.input_height, bundle.preprocess.input_width
    diff = np.asarray(keypoints, np.float64) - np.asarray(nominal, np.float64)
    net = diff * np.array([w / frame_hw[1], h / frame_hw[0]])
    delta = bundle.effective_delta_px
    if bundle.certificate.get("norm") == "l2":
        image_px, net_px = np.hypot(diff[:, 0], diff[:, 1]).max(), np.hypot(net[:, 0], net[:, 1]).max()
    else:
        image_px, net_px = np.abs(diff).max(), np.abs(net).max()
    return float(image_px), float(net_px / delta) if delta > 0 else (math.inf if net_px > 0 else 0.0)


def add_truth(record: FrameRecord, truth: BagTruth, nominal_keypoints: np.ndarray | None, bundle: Bundle,
              covered: PhotometricBox) -> None:
    """Fill the ground-truth fields of ``record``; ``covered`` is the lighting range the
    per-frame decisions cover (the node's ``frame_proof_lighting``, by default the
    certificate's first box), which decides whether the frame is "in range"."""
    record.scenario = truth.scenario
    record.true_contrast, record.true_brightness = truth.contrast, truth.brightness
    record.malformed = truth.malformed
    record.in_region = covered.contains(truth.contrast, truth.brightness)
    if record.keypoints is None or truth.malformed:
        return
    keypoints = np.asarray(record.keypoints)
    if len(truth.keypoints) == len(keypoints):
        # A keypoint the truth leaves unknown (NaN, as for an occluded point) is left out of
        # the frame's error rather than turning every mean it enters into NaN.
        known = np.isfinite(np.asarray(truth.keypoints, np.float64)).all(axis=1)
        if known.any():
            record.error_px = float(np.linalg.norm(keypoints[known] - np.asarray(truth.keypoints)[known],
                                                   axis=1).mean())
    if nominal_keypoints is not None:
        record.deviation_px, record.deviation_ratio = deviation(keypoints, nominal_keypoints,
                                                                (record.height, record.width), bundle)
        record.moved = record.deviation_ratio > 1.0


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def summarise(records: list[FrameRecord]) -> dict:
    """The safety figures of a group of frames (see the module docstring)."""
    n = len(records)
    certified = sum(r.certified for r in records)
    bad = sum(Reason.BAD_INPUT.name in r.reasons for r in records)
    latency = np.array([r.latency_ms for r in records], dtype=np.float64)
    out: dict = {
        "frames": n, "certified_frames": certified, "certified_fraction": _rate(certified, n),
        "bad_input_frames": bad,
        "reasons": dict(sorted(Counter(reason for r in records for reason in r.reasons).items())),
        "latency_ms_p50": float(np.percentile(latency, 50)) if n else None,
        "latency_ms_p99": float(np.percentile(latency, 99)) if n else None,
        "latency_ms_mean": float(latency.mean()) if n else None,
    }
    truth = [r for r in records if r.scenario is not None]
    if not truth:
        return out
    judged = [r for r in truth if r.moved is not None]
    moved = [r for r in judged if r.moved]
    silent = sum(r.certified for r in moved)
    judged_certified = sum(r.certified for r in judged)
    calm = [r for r in judged if r.in_region and not r.moved]
    malformed = [r for r in truth if r.malformed]
    errors = np.array([r.error_px for r in judged if r.error_px is not None])
    out.update({
        "judged_frames": len(judged), "moved_frames": len(moved),
        "in_region_frames": sum(bool(r.in_region) for r in truth),
        "silent_failures": silent, "silent_failure_rate": _rate(silent, judged_certified),
        "silent_failures_in_range": sum(r.certified and bool(r.in_region) for r in moved),
        "silent_failures_outside_range": sum(r.certified and not r.in_region for r in moved),
        "certified_fraction_in_range": _rate(sum(r.certified for r in judged if r.in_region),
                                             sum(bool(r.in_region) for r in judged)),
        "failure_recall": _rate(sum(not r.certified for r in moved), len(moved)),
        "false_alarm_rate": _rate(sum(not r.certified for r in calm), len(calm)),
        "malformed_frames": len(malformed),
        "malformed_detected": sum(Reason.BAD_INPUT.name in r.reasons for r in malformed),
        "unexpected_bad_input": sum(Reason.BAD_INPUT.name in r.reasons for r in truth if not r.malformed),
        "mean_error_px": float(errors.mean()) if len(errors) else None,
        "median_error_px": float(np.median(errors)) if len(errors) else None,
        "max_deviation_ratio": max((r.deviation_ratio for r in judged), default=None),
    })
    return out


def confusion(records: list[FrameRecord]) -> dict[str, int]:
    """Decision against outcome over the judged frames."""
    judged = [r for r in records if r.moved is not None]
    return {"certified_moved": sum(r.certified and r.moved for r in judged),
            "certified_held": sum(r.certified and not r.moved for r in judged),
            "flagged_moved": sum(not r.certified and r.moved for r in judged),
            "flagged_held": sum(not r.certified and not r.moved for r in judged)}


def by_scenario(records: list[FrameRecord]) -> dict[str, list[FrameRecord]]:
    """Records grouped by scenario, in order of first appearance."""
    groups: dict[str, list[FrameRecord]] = {}
    for r in records:
        groups.setdefault(r.scenario or "(no ground truth)", []).append(r)
    return groups
