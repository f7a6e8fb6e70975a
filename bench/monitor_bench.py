"""Runtime monitor cost per 640x480 frame, as a ratio to preprocessing the same frame
(both measured in this process).

    python bench/monitor_bench.py
"""

from __future__ import annotations

import numpy as np
from timing import median_seconds  # noqa: E402  (bench/timing.py, beside this script)

from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.monitor import PhotometricMonitor, nominal_from_images, saturated_fraction
from usn_offline.runtime.preprocess import PreprocessConfig, preprocess


def main() -> None:
    rng = np.random.default_rng(0)
    nominal = nominal_from_images(rng.random((32, 64, 64)))
    monitor = PhotometricMonitor([PhotometricBox(0.9, 1.1, -0.1, 0.1)], nominal)
    config = PreprocessConfig(64, 64)
    print(f"{'frame':>18} | {'preprocess':>10} | {'monitor':>10} | monitor / preprocess")
    for shape in ((480, 640, 3), (480, 640)):
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        image = preprocess(frame, config)
        pre = median_seconds(lambda f=frame: preprocess(f, config), 500)
        mon = median_seconds(lambda f=frame, im=image: monitor.assess(im, saturated_fraction(f, 255)), 500)
        print(f"{str(shape):>18} | {pre * 1e3:7.3f} ms | {mon * 1e3:7.3f} ms | {mon / pre:.2f}")


if __name__ == "__main__":
    main()
