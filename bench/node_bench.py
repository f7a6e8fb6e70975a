"""Per-frame cost of the keypoint node at 640x480 against raw backend inference, both
measured in this process on this machine.

The node's image callback (decode, preprocess, inference, keypoint mapping, monitor,
message building and publishing) is called directly, so DDS transport is not included.

    source scripts/env.sh && python bench/node_bench.py --bundle runs/demo/bundle
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import rclpy
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image
from timing import median_seconds  # noqa: E402  (bench/timing.py, beside this script)
from usn_keypoint_ros.node import KeypointNode

from usn_offline.runtime.preprocess import preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()

    rclpy.init()
    node = KeypointNode(parameter_overrides=[Parameter("bundle_dir", value=args.bundle)])
    rng = np.random.default_rng(0)
    rows = []
    for encoding, channels in (("rgb8", 3), ("mono8", 1)):
        frame = rng.integers(0, 256, (480, 640, channels), dtype=np.uint8).squeeze()
        frame = cv2.GaussianBlur(frame, (0, 0), 3)
        msg = Image(height=480, width=640, encoding=encoding, is_bigendian=0, step=640 * channels,
                    data=frame.tobytes())
        net_input = preprocess(frame, node.bundle.preprocess)[None, None].astype(np.float32)
        raw = median_seconds(lambda x=net_input: node.backend.infer(x), args.repeat)
        full = median_seconds(lambda m=msg: node.on_image(m), args.repeat)
        rows.append((encoding, raw, full))
    node.destroy_node()
    rclpy.try_shutdown()
    print(f"backend: {node.backend.name}")
    print(f"{'frame':>12} | {'raw inference':>13} | {'node callback':>13} | overhead | frames/s")
    for encoding, raw, full in rows:
        print(f"{encoding + ' 640x480':>12} | {raw * 1e3:10.3f} ms | {full * 1e3:10.3f} ms | "
              f"{100 * (full - raw) / raw:6.0f} % | {1 / full:8.0f}")


if __name__ == "__main__":
    main()
