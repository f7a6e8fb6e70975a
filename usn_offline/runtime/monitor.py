"""Runtime photometric monitor (torch-free): is this frame's contrast/brightness inside
the certified region?

Model: the frame is x' = clip(a x + b, 0, 1) of an unseen nominal image x. For the
network-input image (the image the certificate talks about) the mean and standard
deviation satisfy, before clipping, m' = a mu + b and s' = a sigma, where (mu, sigma) are
the nominal image's own statistics, unknown but distributed like those of the nominal
images (recorded in the bundle as mean/std of per-image means and stds). Hence

    a_hat = s' / E[sigma],      b_hat = m' - a_hat E[mu],

with standard uncertainties from the spread of (mu, sigma):

    sd(a) = a_hat sd(sigma) / E[sigma],      sd(b) = sqrt((a_hat sd(mu))^2 + (E[mu] sd(a))^2).

The decision is conservative: the frame counts as certified only when the whole
rectangle [a_hat +- z sd(a)] x [b_hat +- z sd(b)] lies inside one certified box.
Statistics measured on frames of the actual scene under known-good lighting
(:func:`nominal_from_images`, e.g. at start-up) shrink the uncertainty a lot;
statistics of the whole training set describe any scene and are wide.
Clipping biases both statistics, so frames with more clipped pixels than a threshold
are flagged SATURATED whatever the estimate says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import cv2
import numpy as np

from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.bundle import NominalStatistics


class Reason(IntEnum):
    """Values match the constants of usn_keypoint_msgs/CertificationStatus."""

    OUT_OF_REGION = 1
    SATURATED = 2
    BAD_INPUT = 3
    CERTIFICATE_MISMATCH = 4
    UNCERTAIN_ESTIMATE = 5
    NOT_PROVED = 6
    NOT_CHECKED = 7


def nominal_from_images(images: np.ndarray) -> NominalStatistics:
    """Summarise per-image mean/std of (N, H, W) images in [0, 1]."""
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    means, stds = flat.mean(axis=1), flat.std(axis=1)
    low, high = np.percentile(stds, [1, 99])
    return NominalStatistics(mean_of_means=float(means.mean()), std_of_means=float(means.std()),
                             mean_of_stds=float(stds.mean()), std_of_stds=float(stds.std()),
                             num_images=len(images), low_std=float(low), high_std=float(high))


@dataclass
class MonitorResult:
    contrast: float
    brightness: float
    contrast_stddev: float
    brightness_stddev: float
    margin: float
    saturated_fraction: float
    reasons: list[Reason] = field(default_factory=list)
    detail: str = ""
    # The per-frame proof: largest proven keypoint deviation (network-input pixels; None
    # when no proof ran or it proved nothing).
    proven_deviation_px: float | None = None
    # Why the scene check found the frame outside the lighting range (None: it did not,
    # or did not run); such a frame is OUT_OF_REGION whatever the estimate says.
    scene_finding: str | None = None

    @property
    def certified(self) -> bool:
        return not self.reasons


@dataclass
class PhotometricMonitor:
    """Decides per frame whether its estimated (contrast, brightness) lies in the region."""

    region: list[PhotometricBox]
    nominal: NominalStatistics
    z: float = 2.0  # half-width of the uncertainty rectangle, in standard deviations
    max_saturated_fraction: float = 0.05
    min_std: float = 0.01  # flatter frames carry no contrast information

    def __post_init__(self) -> None:
        if not self.region:
            raise ValueError("the certified region is empty")
        if self.z < 0 or not 0 <= self.max_saturated_fraction <= 1:
            raise ValueError("z must be >= 0 and max_saturated_fraction in [0, 1]")
        if self.nominal.mean_of_stds <= 0:
            raise ValueError("nominal mean_of_stds must be > 0")

    def estimate(self, image: np.ndarray, std: float | None = None, mean: float | None = None
                 ) -> tuple[float, float, float, float]:
        """(a, b, sd(a), sd(b)) from a network-input image (H, W) in [0, 1] (``std``, ``mean``:
        its standard deviation and mean, when already measured)."""
        m = float(image.mean()) if mean is None else mean
        s = float(image.std()) if std is None else std
        nom = self.nominal
        a = s / nom.mean_of_stds
        b = m - a * nom.mean_of_means
        sa = a * nom.std_of_stds / nom.mean_of_stds
        sb = math.hypot(a * nom.std_of_means, nom.mean_of_means * sa)
        return a, b, sa, sb

    def margin(self, a: float, b: float, ha: float, hb: float) -> float:
        """Signed distance of the rectangle [a +- ha] x [b +- hb] to the region border
        (largest over the boxes; >= 0 means it fits inside one box)."""
        return max(min(a - ha - box.a_lo, box.a_hi - (a + ha), b - hb - box.b_lo, box.b_hi - (b + hb))
                   for box in self.region)

    def assess(self, image: np.ndarray, saturated_fraction: float = 0.0, std: float | None = None,
               mean: float | None = None) -> MonitorResult:
        """Decide for one frame. ``saturated_fraction`` is measured on the raw frame
        (:func:`saturated_fraction`), where clipping happens; ``std``, ``mean``: the image's
        standard deviation and mean, when already measured (:func:`mean_and_std`)."""
        std = float(image.std()) if std is None else std
        a, b, sa, sb = self.estimate(image, std, mean)
        margin = self.margin(a, b, self.z * sa, self.z * sb)
        result = MonitorResult(a, b, sa, sb, margin, saturated_fraction)
        details = []
        if std < self.min_std:
            result.reasons.append(Reason.UNCERTAIN_ESTIMATE)
            details.append(f"image std {std:.4f} < {self.min_std}: contrast cannot be estimated")
        elif margin < 0:
            result.reasons.append(Reason.OUT_OF_REGION)
            details.append(f"(a, b) = ({a:.3f} +- {self.z * sa:.3f}, {b:.3f} +- {self.z * sb:.3f}) "
                           f"not inside the certified region (margin {margin:.3f})")
        if saturated_fraction > self.max_saturated_fraction:
            result.reasons.append(Reason.SATURATED)
            details.append(f"{100 * saturated_fraction:.1f} % clipped pixels "
                           f"> {100 * self.max_saturated_fraction:g} %")
        result.detail = "; ".join(details)
        return result


def mean_and_std(image: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of a float32 network-input image, in one
    OpenCV pass accumulated in float64 (numpy's std is five passes: 0.06 ms instead of 0.015
    after a heavy inference has evicted the caches, bench/node_bench.py)."""
    mean, std = cv2.meanStdDev(image)
    return float(mean[0, 0]), float(std[0, 0])


def saturated_fraction(frame: np.ndarray, max_value: float) -> float:
    """Fraction of pixels at 0 or at ``max_value`` in any colour channel of a raw frame
    (an RGBA frame's alpha is not light: an opaque frame is not a saturated one)."""
    return clipped_shares(frame, max_value)[0]


def clipped_shares(frame: np.ndarray, max_value: float) -> tuple[float, float, float]:
    """Fractions of a raw frame's pixels with some colour channel at 0 or at ``max_value``
    (:func:`saturated_fraction`), with one at 0, and with one at ``max_value`` (alpha is
    not light). The node measures all three in one place, right after the preprocessing
    while the frame is still in the CPU's cache: the scene check weighs the last two
    (``SceneContrastCheck.error_bound``), and counting them after inference read the
    frame back from memory twice more."""
    if frame.size == 0:
        return 0.0, 0.0, 0.0
    if frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[:, :, :3]
    pixels = frame.shape[0] * frame.shape[1]
    channels = 1 if frame.ndim == 2 else frame.shape[2]
    if frame.dtype in (np.uint8, np.uint16) and frame.flags.c_contiguous:
        # Most frames clip nowhere: one min/max pass over the values (~15x cheaper than
        # counting) settles them.
        low, high, _, _ = cv2.minMaxLoc(frame.reshape(frame.shape[0], -1))
        if low > 0 and high < max_value:
            return 0.0, 0.0, 0.0
    if frame.dtype in (np.uint8, np.uint16) and channels <= 4:
        # cv2.inRange marks the pixels whose every channel is in range: ~20x faster than
        # the numpy expression on a 640x480 frame; the two masks' AND gives the third.
        top = int(max_value)
        no_black = cv2.inRange(frame, (1,) * channels, (top,) * channels)
        no_blown = cv2.inRange(frame, (0,) * channels, (top - 1,) * channels)
        inside = cv2.countNonZero(cv2.bitwise_and(no_black, no_blown))
        return ((pixels - inside) / pixels, (pixels - cv2.countNonZero(no_black)) / pixels,
                (pixels - cv2.countNonZero(no_blown)) / pixels)
    black, blown = frame <= 0, frame >= max_value
    if black.ndim == 3:
        black, blown = black.any(axis=2), blown.any(axis=2)
    return (float(np.count_nonzero(black | blown)) / pixels, float(np.count_nonzero(black)) / pixels,
            float(np.count_nonzero(blown)) / pixels)
