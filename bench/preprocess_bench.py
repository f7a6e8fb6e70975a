"""Per-frame work before inference, as ratios to a baseline timed in this process.

1. ``preprocess`` of 8-bit camera frames (the vertical area step first, as exact integer
   sums of whole rows, then the luma and the horizontal step on 64 rows) against the
   general path (float luma, then OpenCV's area resize), which gives the same input up to
   float32 rounding.
2. The clipped-pixel fraction of a frame that clips nowhere (one min/max pass) against
   counting with ``cv2.inRange`` (what a frame with clipped pixels takes).

    source scripts/env.sh && python bench/preprocess_bench.py
"""

from __future__ import annotations

import cv2
import numpy as np
from timing import median_seconds  # noqa: E402  (bench/timing.py, beside this script)

from usn_offline.runtime.monitor import saturated_fraction
from usn_offline.runtime.preprocess import PreprocessConfig, preprocess, resize_image, to_gray_float

FRAMES = (("rgb8 640x480", (480, 640, 3)), ("mono8 640x480", (480, 640)), ("rgb8 1280x720", (720, 1280, 3)))


def main() -> None:
    rng = np.random.default_rng(0)
    config = PreprocessConfig(64, 64)
    print(f"{'frame':>14} | {'preprocess':>10} | {'general path':>12} | ratio | {'clip check':>10} | "
          f"{'inRange count':>13} | ratio")
    for name, shape in FRAMES:
        frame = rng.integers(1, 255, shape, dtype=np.uint8)  # clips nowhere
        assert np.abs(preprocess(frame, config) - resize_image(to_gray_float(frame), config)).max() < 1e-6
        fast = median_seconds(lambda f=frame: preprocess(f, config), 300)
        general = median_seconds(lambda f=frame: resize_image(to_gray_float(f), config), 300)
        channels = 1 if frame.ndim == 2 else frame.shape[2]
        low, high = (1,) * channels, (254,) * channels
        check = median_seconds(lambda f=frame: saturated_fraction(f, 255), 300)
        count = median_seconds(lambda f=frame, lo=low, hi=high: cv2.countNonZero(cv2.inRange(f, lo, hi)), 300)
        print(f"{name:>14} | {fast * 1e3:7.3f} ms | {general * 1e3:9.3f} ms | {fast / general:5.2f} | "
              f"{check * 1e3:7.3f} ms | {count * 1e3:10.3f} ms | {check / count:5.2f}")


if __name__ == "__main__":
    main()
