"""Cost of the keypoint node beyond the backend's inference, with the shipped parameters,
and whether it keeps up with a 30 Hz camera over DDS.

1. The node's image callback (decode, preprocess, inference, keypoint mapping, scene check,
   monitor, messages, publishing; the per-frame proof runs in its own process, as shipped)
   against raw backend inference of the same input, both timed in this process: for the
   bundle's network, and for a heavier network of >= 5 ms (random weights, same input and
   output shapes) served through the same node.
2. A node in its own process (shipped parameter file: SENSOR_DATA QoS, frame proofs on)
   fed by a camera publisher at 30 Hz, 640x480 and 1280x720 rgb8: frames answered and
   the status latency (publish -> status received).

    source scripts/env.sh && python bench/node_bench.py --bundle runs/demo/bundle
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
from timing import median_seconds  # noqa: E402  (bench/timing.py, beside this script)

from usn_offline.runtime.dds import large_frame_environment

REPO = Path(__file__).resolve().parents[1]
SHIPPED_PARAMS = REPO / "launch" / "usn_keypoint_node.params.yaml"
SIZES = ((640, 480), (1280, 720))
ROUNDS = 5


def _scene(data: str, width: int, height: int, channels: int, index: int = 0, clipped: bool = False) -> np.ndarray:
    """Test image ``index`` of the dataset as a camera frame: upscaled 8-bit, RGB or mono, so
    that the scene check passes it and the shipped per-frame proof runs as on a real scene.
    ``clipped``: its top twelfth blown (255) and a corner an eighth of each side black (0),
    as glare and shadow leave a frame (the scene check then weighs the clipped pixels)."""
    from usn_offline.data import load_split

    image = load_split(data, "test").images[index]
    frame = cv2.resize((255 * image).round().astype(np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)
    if clipped:
        frame[: height // 12] = 255
        frame[-(height // 8):, : width // 8] = 0
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB) if channels == 3 else frame


def _image(frame: np.ndarray, encoding: str):
    from sensor_msgs.msg import Image

    h, w = frame.shape[:2]
    return Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=frame.strides[0],
                 data=frame.tobytes())


def _heavy_backend(input_hw: tuple[int, int], outputs: int, target_ms: float, workdir: Path):
    """An ONNX Runtime backend of a plain conv stack (random weights) with the bundle model's
    input and output shapes, widened in steps of 8 channels until one inference takes >=
    ``target_ms``: the first such network, so its time is close to the target (the
    overhead's share is largest for the fastest network the target allows)."""
    import torch

    from usn_offline.runtime.backends import OnnxRuntimeBackend

    x = np.random.default_rng(0).random((1, 1, *input_hw), dtype=np.float32)
    for width in range(32, 257, 8):
        layers, channels = [], 1
        for _ in range(4):
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
            channels = width
        model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(width, outputs), torch.nn.Sigmoid()).eval()
        path = workdir / f"heavy_{width}.onnx"
        torch.onnx.export(model, torch.from_numpy(x), str(path), input_names=["image"], output_names=["keypoints"],
                          dynamo=False)
        backend = OnnxRuntimeBackend(path)
        if median_seconds(lambda b=backend: b.infer(x), 20) * 1e3 >= target_ms:
            return backend, width
    return backend, width


def callback_costs(bundle_dir: str, data: str, repeat: int, heavy_ms: float, clipped: bool = False,
                   pace_hz: float = 0.0) -> None:
    import rclpy
    from rclpy.parameter import Parameter
    from usn_keypoint_ros.node import KeypointNode

    shipped = yaml.safe_load(SHIPPED_PARAMS.read_text())["usn_keypoint_node"]["ros__parameters"]
    cases = [("rgb8", 3, 640, 480), ("mono8", 1, 640, 480), ("rgb8", 3, 1280, 720)]
    rows = []
    rclpy.init()
    for proofs in (True, False):
        overrides = [Parameter(k, value=v) for k, v in {**shipped, "frame_proof": proofs}.items()]
        node = KeypointNode(parameter_overrides=overrides + [Parameter("bundle_dir", value=bundle_dir)])
        _measure_node(node, cases, data, repeat, heavy_ms, "shipped" if proofs else "shipped, proofs off", rows,
                      clipped, pace_hz)
        node.destroy_node()
    rclpy.try_shutdown()
    print(f"1. node callback vs raw inference, parameters of {SHIPPED_PARAMS.name} (frame proofs in their own "
          f"process; also with frame_proof off), in this process: {ROUNDS} rounds of {repeat // ROUNDS} calls "
          "of each, medians over the rounds; overhead = callback - inference"
          + ("; scenes with blown and black pixels" if clipped else "")
          + (f"; each call {1e3 / pace_hz:.1f} ms after the previous one began, as at a {pace_hz:g} Hz camera"
             if pace_hz else "; calls back to back"))
    print(f"{'parameters':>19} | {'network':>22} | {'frame':>13} | {'inference':>9} | {'overhead':>8} | overhead %")
    for params, label, frame, raw, overhead in rows:
        print(f"{params:>19} | {label:>22} | {frame:>13} | {raw * 1e3:6.3f} ms | {overhead * 1e3:5.3f} ms | "
              f"{100 * overhead / raw:8.1f} %")


def _measure_node(node, cases, data: str, repeat: int, heavy_ms: float, params: str, rows: list,
                  clipped: bool = False, pace_hz: float = 0.0) -> None:
    from usn_offline.runtime.preprocess import preprocess

    last_start = [0.0]

    def paced(prepare=None):
        """Untimed, before each call: wait until 1/pace_hz after the previous call began
        (a camera's frame interval: the node idles between frames, and what the machine ran
        meanwhile leaves the caches cold), then ``prepare``."""
        if pace_hz:
            while time.perf_counter() < last_start[0] + 1.0 / pace_hz:
                time.sleep(max(0.0, min(0.002, last_start[0] + 1.0 / pace_hz - time.perf_counter())))
            last_start[0] = time.perf_counter()
        if prepare is not None:
            prepare()

    def measure(label: str) -> None:
        for encoding, channels, width, height in cases:
            frame = _scene(data, width, height, channels, clipped=clipped)
            msg = _image(frame, encoding)
            net_input = preprocess(frame, node.bundle.preprocess)[None, None].astype(np.float32)
            # Each call gets a message made just before it (untimed), as rclpy's take
            # writes each arriving frame into a new message: a reused one would be read
            # back from memory, evicted from the cache by the previous call's inference.
            arriving = [msg]
            # Raw inference and the callback alternate in rounds, so that a slow spell of
            # this shared machine weighs on both; the medians over the rounds are reported.
            raws, fulls = [], []
            for _ in range(ROUNDS):
                raws.append(median_seconds(lambda x=net_input: node.pipeline.backend.infer(x), repeat // ROUNDS,
                                           setup=paced))
                fulls.append(median_seconds(lambda a=arriving: node.on_image(a[0]), repeat // ROUNDS, setup=lambda
                                            a=arriving, f=frame, e=encoding: paced(
                                                lambda: a.__setitem__(0, _image(f, e)))))
            overhead = float(np.median(np.subtract(fulls, raws)))
            rows.append((params, label, f"{encoding} {width}x{height}", float(np.median(raws)), overhead))

    measure(f"bundle's ({node.backend.name})")
    with tempfile.TemporaryDirectory() as tmp:
        h, w = node.bundle.preprocess.input_height, node.bundle.preprocess.input_width
        heavy, width = _heavy_backend((h, w), 2 * len(node.bundle.keypoint_names), heavy_ms, Path(tmp))
        node.pipeline.backend = heavy
        measure(f"heavier (4 conv x {width})")


def camera_rate(bundle_dir: str, data: str, seconds: float, rate_hz: float) -> None:
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from usn_keypoint_msgs.msg import CertificationStatus

    topic = "/usn_bench/camera/image_raw"
    node_proc = subprocess.Popen(
        [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "--params-file", str(SHIPPED_PARAMS),
         "-p", f"bundle_dir:={bundle_dir}", "-r", f"image:={topic}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    received: dict[int, float] = {}
    results: dict[int, tuple[bool, tuple]] = {}

    def on_status(msg) -> None:
        key = msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec
        received[key] = time.monotonic()
        results[key] = (msg.certified, tuple(msg.reasons) if hasattr(msg, "reasons") else ())

    rclpy.init()
    rows = []
    try:
        bench = Node("usn_bench_camera")
        pub = bench.create_publisher(__import__("sensor_msgs.msg", fromlist=["Image"]).Image, topic,
                                     QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        bench.create_subscription(CertificationStatus, "/usn_keypoint_node/status", on_status,
                                  QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        deadline = time.monotonic() + 90
        while not (pub.get_subscription_count() and bench.count_publishers("/usn_keypoint_node/status")):
            if node_proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the node did not start: {node_proc.stderr.read().decode()[-2000:]}")
            rclpy.spin_once(bench, timeout_sec=0.1)
        stamp = 1
        for width, height in SIZES:
            frames = [_scene(data, width, height, 3, index) for index in range(8)]
            sent: dict[int, float] = {}
            start = time.monotonic()
            for i in range(int(seconds * rate_hz)):
                msg = _image(frames[i % len(frames)], "rgb8")
                msg.header.stamp.sec, msg.header.stamp.nanosec = stamp, 0
                key = stamp * 10 ** 9
                stamp += 1
                due = start + i / rate_hz
                while time.monotonic() < due:
                    rclpy.spin_once(bench, timeout_sec=max(0.0, min(0.005, due - time.monotonic())))
                sent[key] = time.monotonic()
                pub.publish(msg)
            end = time.monotonic() + 10
            while time.monotonic() < end and not all(k in received for k in sent):
                rclpy.spin_once(bench, timeout_sec=0.05)
            answered = [k for k in sent if k in received]
            latency = np.array([received[k] - sent[k] for k in answered]) * 1e3
            certified = sum(results[k][0] for k in answered)
            rows.append((f"{width}x{height}", len(sent), len(answered), certified,
                         *(np.percentile(latency, (50, 95)) if len(latency) else (np.nan, np.nan))))
        bench.destroy_node()
    finally:
        rclpy.try_shutdown()
        node_proc.terminate()
        node_proc.communicate(timeout=30)
    print(f"\n2. camera at {rate_hz:g} Hz over DDS for {seconds:g} s per size, node with {SHIPPED_PARAMS.name} "
          "(its own process)")
    print(f"{'frame':>10} | {'sent':>5} | {'answered':>8} | {'certified':>9} | latency median | p95")
    for frame, sent_n, answered_n, certified, p50, p95 in rows:
        print(f"{frame:>10} | {sent_n:5d} | {answered_n:8d} | {certified:9d} | {p50:11.1f} ms | {p95:5.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--data", default="runs/demo/data", help="the dataset whose test images are the scenes")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--heavy-ms", type=float, default=5.0, help="inference time of the heavier network")
    parser.add_argument("--seconds", type=float, default=5.0, help="camera run per frame size")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate (Hz)")
    parser.add_argument("--clipped", action="store_true",
                        help="part 1 on scenes with blown and black pixels (the scene check weighs them)")
    parser.add_argument("--callback-only", action="store_true", help="part 1 only (no camera run)")
    parser.add_argument("--pace", type=float, default=0.0, metavar="HZ",
                        help="part 1 at a camera's rate: each call (raw inference and callback alike) begins "
                             "1/HZ after the previous one; 0: back to back")
    args = parser.parse_args()
    # DDS on loopback, the shipped large-frame profile, a domain of its own.
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", "91")
    for name, value in large_frame_environment().items():
        os.environ.setdefault(name, value)
    if args.pace < 0:
        parser.error(f"--pace must be >= 0, got {args.pace}")
    callback_costs(args.bundle, args.data, args.repeat, args.heavy_ms, args.clipped, args.pace)
    if not args.callback_only:
        camera_rate(args.bundle, args.data, args.seconds, args.rate)


if __name__ == "__main__":
    main()
