"""Is a frame's contrast one that the lighting range can give a scene like ours? (torch-free)

A per-frame proof covers the frames clip(a0 X0 + b0) with (a0, b0) in the stated range R.
From the frame alone, a darker light and a flatter scene look the same, so a frame far
darker than R allows (a tunnel at a0 = 0.35) can still be proved for R and served as
certified. This check withholds such frames under one stated assumption about the
scene: its nominal view's contrast, the standard deviation s0 of the network-input image
L X0 (L: the pipeline's luma and resize), lies in [min_std, max_std] (by default the 1st
and 99th percentile over the training images, recorded in the bundle).

Why it is sound under that assumption. Write Y = a0 X0 + b0 before clipping and F the
frame as the network sees it (L of the frame, in [0, 1]). L is linear, so
std(L Y) = a0 s0, which lies in [a_lo min_std, a_hi max_std] when (a0, b0) is in R.
The frame differs from Y only where a pixel clipped (by an error in [b_lo, 0] below
0 and in [0, a_hi + b_hi - 1] above full scale, given (a0, b0) in R and X0 in [0, 1])
and by the camera's rounding (half a level). The standard deviation is a seminorm, so
|std(F) - std(L Y)| <= sum over these errors e of std(L e). Each row of L is
non-negative and sums to 1, so an error in [-E, 0] on the pixels of a mask m gives
values L e in [-E, 0] with mean at least -E q, q = mean(L m); by the Bhatia-Davis
inequality its variance is at most E^2 q (1 - q) (E^2 / 4 once q > 1/2); rounding adds
at most half a level. If std(F) is farther than that from the interval, no (a0, b0) in
R explains the frame for any scene of the assumed contrast: it is flagged OUT_OF_REGION
and not proved. The check only ever withholds; what ``certified: true`` promises still rests
on the per-frame proof.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from usn_offline.errors import ConfigError
from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.preprocess import PreprocessConfig, area_averaged, full_scale, resize_image

# float32 arithmetic of the preprocessing (a few ulps of values in [0, 1]), with room.
_FLOAT_SLACK = 1e-5


@dataclass(frozen=True)
class SceneContrastCheck:
    """Flags frames whose contrast the lighting range cannot give a scene whose own
    network-input standard deviation lies in [min_std, max_std]."""

    lighting: PhotometricBox
    min_std: float
    max_std: float
    preprocess: PreprocessConfig

    def __post_init__(self) -> None:
        if not (0 <= self.min_std <= self.max_std) or not math.isfinite(self.max_std):
            raise ValueError(f"scene std range must satisfy 0 <= min <= max < inf, got "
                             f"[{self.min_std}, {self.max_std}]")
        if not self.lighting.a_lo > 0:
            raise ValueError(f"the lighting range needs contrast > 0, got {self.lighting.a_lo}")

    def error_bound(self, frame: np.ndarray, clipped_fraction: float | None = None,
                    clipped: tuple[float, float] | None = None) -> float:
        """Largest possible |std(L frame) - std(L Y)| for (a0, b0) in the range (see the
        module docstring). ``clipped_fraction``: the frame's fraction of pixels with a
        channel at 0 or full scale (monitor.saturated_fraction) when already measured; at
        0 the clipping terms vanish and the masks are not built. ``clipped``: the fractions
        of its pixels with a channel at 0 and at full scale (monitor.clipped_shares), when
        already measured."""
        scale = full_scale(frame.dtype)
        bound = 0.0
        if clipped_fraction is None or clipped_fraction > 0:
            pixels = frame[:, :, :3] if frame.ndim == 3 and frame.shape[2] == 4 else frame  # alpha is not light
            low, high = self._clip_weights(pixels, scale, clipped)
            box = self.lighting
            below, above = max(0.0, -box.b_lo), max(0.0, box.a_hi + box.b_hi - 1.0)
            bound = below * _spread(low) + above * _spread(high)
        rounding = 0.5 / scale if frame.dtype.kind in "ui" else 0.0
        return bound + rounding + _FLOAT_SLACK

    def _clip_weights(self, pixels: np.ndarray, scale: float, shares: tuple[float, float] | None = None
                      ) -> tuple[float, float]:
        """mean(L m) of the masks of pixels with some channel at 0 and at full scale.

        When the preprocessing area-averages the frame, each frame pixel weighs the same
        in the input's mean, so mean(L m) is the mask's share of the pixels: ``shares``
        when measured already, else two OpenCV counts for an 8/16-bit frame (0.5 ms at
        rgb8 640x480 against 1.9 ms for the masks and their resizes, which a frame with
        clipped pixels used to cost every time)."""
        h, w = pixels.shape[:2]
        channels = 1 if pixels.ndim == 2 else pixels.shape[2]
        if (area_averaged(h, w, self.preprocess) and pixels.dtype in (np.uint8, np.uint16) and channels <= 4
                and h * w > 0):
            if shares is not None:
                return _rounded_up(shares[0]), _rounded_up(shares[1])
            return tuple(_rounded_up((h * w - cv2.countNonZero(none)) / (h * w))
                         for none in _unclipped_masks(pixels, int(scale)))
        low, high = _clipped_masks(pixels, scale)
        return self._mean_weight(low), self._mean_weight(high)

    def _mean_weight(self, mask: np.ndarray) -> float:
        """mean(L m) of a pixel mask (how much of the network input it feeds), rounded up:
        the bound grows with it, and the frame's own resize may take OpenCV's separable
        path, equal up to float rounding."""
        if not mask.any():
            return 0.0
        return _rounded_up(float(resize_image(mask.astype(np.float32), self.preprocess).mean()))

    def check(self, frame: np.ndarray, image: np.ndarray, clipped_fraction: float | None = None,
              std: float | None = None, clipped: tuple[float, float] | None = None) -> str | None:
        """Why no lighting change of the range explains ``frame`` (whose network input is
        ``image``) for a scene of the assumed contrast, or None when one may
        (``clipped_fraction``, ``clipped``: see :meth:`error_bound`; ``std``: the image's
        standard deviation, when already measured)."""
        std = float(image.std()) if std is None else std
        slack = self.error_bound(frame, clipped_fraction, clipped)
        lowest, highest = self.lighting.a_lo * self.min_std, self.lighting.a_hi * self.max_std
        if std + slack < lowest:
            return (f"frame contrast too low for the lighting range: image std {std:.4f} (+-{slack:.4f}) < "
                    f"{lowest:.4f} = contrast {self.lighting.a_lo:g} x the scenes' lowest std {self.min_std:.4f}")
        if std - slack > highest:
            return (f"frame contrast too high for the lighting range: image std {std:.4f} (+-{slack:.4f}) > "
                    f"{highest:.4f} = contrast {self.lighting.a_hi:g} x the scenes' highest std {self.max_std:.4f}")
        return None


def _rounded_up(weight: float) -> float:
    """A mask's weight in the input's mean, rounded up past float32 resize rounding (0
    stays 0: no clipped pixel, no error term)."""
    return weight * (1 + 1e-5) + 1e-7 if weight > 0 else 0.0


def _spread(q: float) -> float:
    """Largest std / E of values in [-E, 0] whose mean is at least -E q (Bhatia-Davis)."""
    return 0.5 if q > 0.5 else math.sqrt(max(0.0, q * (1.0 - q)))


def _unclipped_masks(pixels: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's range test over all channels at once (8/16-bit, up to 4 channels): uint8
    masks (255/0) of the pixels with no channel at 0, and with no channel at ``top``."""
    n = 1 if pixels.ndim == 2 else pixels.shape[2]
    return cv2.inRange(pixels, (1,) * n, (top,) * n), cv2.inRange(pixels, (0,) * n, (top - 1,) * n)


def _clipped_masks(pixels: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels with some channel at 0, and with some channel at full scale."""
    if pixels.ndim == 2:
        return pixels <= 0, pixels >= scale
    if pixels.dtype in (np.uint8, np.uint16) and pixels.shape[2] <= 4:
        none_low, none_high = _unclipped_masks(pixels, int(scale))
        return none_low == 0, none_high == 0
    # Channel by channel: a reduction over the short last axis is ~20x slower (5 ms at 640x480).
    channels = [pixels[:, :, c] for c in range(pixels.shape[2])]
    return functools.reduce(np.fmin, channels) <= 0, functools.reduce(np.fmax, channels) >= scale


def make_scene_check(bundle: Bundle, enabled: bool, lighting: PhotometricBox,
                     std_range: tuple[float, ...] = (0.0, 0.0)) -> SceneContrastCheck | None:
    """The check the node and the replay use: the scene std range ``std_range`` (min,
    max), or, when it is all zero, the training images' 1st-99th percentile from the
    bundle. None when ``enabled`` is off; a bundle exported without those statistics
    needs ``std_range``."""
    if not enabled:
        return None
    if len(std_range) != 2:
        raise ConfigError(f"scene_std_range needs 2 numbers (min, max), got {list(std_range)}")
    if any(std_range):
        low, high = (float(v) for v in std_range)
    elif bundle.nominal.low_std is None or bundle.nominal.high_std is None:
        raise ConfigError("the bundle records no scene contrast statistics (exported before they existed): "
                          "re-export it, set scene_std_range, or turn scene_check off")
    else:
        low, high = bundle.nominal.low_std, bundle.nominal.high_std
    try:
        return SceneContrastCheck(lighting, low, high, bundle.preprocess)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
