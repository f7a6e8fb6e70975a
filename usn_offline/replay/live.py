"""Live replay: the real node as its own process, started with the node's parameters file,
fed the bag's images over DDS; its status and keypoint messages are recorded (an MCAP bag)
and compared frame by frame with the offline replay of the same bag.

Publishing is lock-step by default (the next frame goes out when the node has answered
the previous one, so nothing is dropped for being late); ``rate`` > 0 publishes at the
bag's recorded timing instead (``rate`` times real time), with ``/clock`` and the node on
``use_sim_time``. Needs rclpy and the ``usn_keypoint_msgs``/``usn_keypoint_ros`` packages.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from usn_offline.errors import ConfigError, ReplayError
from usn_offline.jsonio import finite_only
from usn_offline.replay.bag_reader import BagImage, BagReader
from usn_offline.replay.offline import ReplayRun
from usn_offline.replay.typestore import CERTIFICATION_STATUS, KEYPOINT_ARRAY, replay_typestore
from usn_offline.runtime.dds import large_frame_environment
from usn_offline.runtime.monitor import Reason

NODE_NAME = "usn_keypoint_node"
REASON_NAMES = {int(r): r.name for r in Reason}  # CertificationStatus reason codes


@dataclass(frozen=True)
class LiveConfig:
    image_topic: str | None = None  # the bag's image topic (None: its only one)
    node_image_topic: str = "/usn_replay/camera/image_raw"  # what the node subscribes to (its 'image' remapped)
    # Per frame (lock-step) or after the last frame (timed). A liveness bound, not a timing
    # check: a frame's proof is budgeted in boxes and its CROWN boxes take seconds each on a CPU.
    timeout_s: float = 600.0
    startup_timeout_s: float = 90.0
    rate: float = 0.0  # 0: lock-step; > 0: recorded timing at this speed, with /clock
    record: bool = True  # the node's outputs into <out>/live_outputs (MCAP)

    def __post_init__(self) -> None:
        if self.rate < 0 or not math.isfinite(self.rate):
            raise ConfigError(f"live rate must be 0 (lock-step) or a positive speed-up, got {self.rate}")
        if not self.timeout_s > 0 or not self.startup_timeout_s > 0:
            raise ConfigError("live replay timeouts must be > 0 s")


@dataclass
class LiveFrame:
    stamp_ns: int
    sent_at: float
    certified: bool | None = None
    reasons: tuple[str, ...] | None = None
    contrast: float | None = None
    brightness: float | None = None
    keypoints: list[list[float]] | None = None
    statuses: int = 0
    latency_ms: float | None = None


@dataclass
class LiveRun:
    frames: list[LiveFrame]
    seconds: float  # from the first frame sent to the last answer (node start-up excluded)
    node_stderr: str = ""
    extra_statuses: int = 0  # statuses whose stamp matches no frame sent
    recorded: Path | None = None
    reason_names: dict[int, str] = field(default_factory=dict)


def _node_command(bundle_dir: Path, params_file: Path, topic: str, compressed: bool, sim_time: bool) -> list[str]:
    cmd = [sys.executable, "-m", "usn_keypoint_ros.node", "--ros-args", "--params-file", str(params_file),
           "-p", f"bundle_dir:={bundle_dir}", "-r", f"image:={topic}"]
    if compressed:
        cmd += ["-p", "input_transport:=compressed"]
    if sim_time:
        cmd += ["-p", "use_sim_time:=true"]
    return cmd


def _stop(proc: subprocess.Popen, log_path: Path) -> str:
    """Stop the node (SIGINT, as ros2 launch does) and return the tail of its log."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return log_path.read_bytes()[-20000:].decode(errors="replace")


def replay_live(bag: Path | str, bundle_dir: Path | str, params_file: Path | str, config: LiveConfig,
                out: Path | str, progress: bool = True) -> LiveRun:
    """Publish every image of ``bag`` to a freshly started node and collect its answers."""
    try:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rclpy.serialization import serialize_message
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CompressedImage, Image
        from usn_keypoint_msgs.msg import CertificationStatus, KeypointArray
    except ImportError as exc:
        raise ReplayError(f"live replay needs ROS 2 (rclpy) and the usn_keypoint_msgs package ({exc}); "
                          "source scripts/env.sh or your ROS workspace") from exc

    out = Path(out)
    bundle_dir, params_file = Path(bundle_dir).resolve(), Path(params_file).resolve()
    reader = BagReader(bag, config.image_topic)
    compressed = reader.topics[reader.image_topic].endswith("CompressedImage")
    publish_topic = config.node_image_topic + ("/compressed" if compressed else "")
    env = {**os.environ, **large_frame_environment()}
    os.environ.update(large_frame_environment())  # our own participant publishes the large frames
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "live_node.log"  # a file, not a pipe: a chatty node must never block on a full pipe
    log = log_path.open("wb")
    proc = subprocess.Popen(_node_command(bundle_dir, params_file, config.node_image_topic, compressed,
                                          config.rate > 0), env=env, stdout=log, stderr=subprocess.STDOUT)
    frames: dict[int, LiveFrame] = {}
    order: list[int] = []
    extra = 0
    recorded: list[tuple[str, int, bytes]] = []
    context = rclpy.Context()
    rclpy.init(context=context)
    seconds = 0.0
    try:
        node = Node("usn_replay_publisher", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        # A camera driver's QoS: reliable, keep last (the node's own input_qos decides what it gets).
        pub = node.create_publisher(CompressedImage if compressed else Image, publish_topic,
                                    QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        clock_pub = node.create_publisher(Clock, "/clock", 10) if config.rate > 0 else None
        answers = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        status_topic, keypoint_topic = f"/{NODE_NAME}/status", f"/{NODE_NAME}/keypoints"

        def on_status(msg) -> None:
            nonlocal extra
            stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            frame = frames.get(stamp)
            if frame is None:
                extra += 1
                return
            frame.statuses += 1
            if frame.statuses == 1:
                frame.latency_ms = 1e3 * (time.perf_counter() - frame.sent_at)
                frame.certified = bool(msg.certified)
                frame.reasons = tuple(REASON_NAMES.get(int(r), str(int(r))) for r in msg.reasons)
                frame.contrast, frame.brightness = float(msg.contrast), float(msg.brightness)
            if config.record:
                recorded.append((status_topic, time.time_ns(), serialize_message(msg)))

        def on_keypoints(msg) -> None:
            stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            if stamp in frames:
                frames[stamp].keypoints = [[float(k.x), float(k.y)] for k in msg.keypoints]
            if config.record:
                recorded.append((keypoint_topic, time.time_ns(), serialize_message(msg)))

        node.create_subscription(CertificationStatus, status_topic, on_status, answers)
        node.create_subscription(KeypointArray, keypoint_topic, on_keypoints, answers)

        def spin_until(done, timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            while not done():
                if time.monotonic() > deadline or proc.poll() is not None:
                    return done()
                executor.spin_once(timeout_sec=0.005)
            return True

        ready = spin_until(lambda: pub.get_subscription_count() > 0 and node.count_publishers(status_topic) > 0,
                           config.startup_timeout_s)
        if not ready:
            raise ReplayError(f"the node did not come up within {config.startup_timeout_s:g} s"
                              + (f" (it exited with code {proc.returncode})" if proc.poll() is not None else "")
                              + f": {_stop(proc, log_path).strip()[-1500:]}")
        spin_until(lambda: False, 0.5)  # let the node's subscription settle before the first frame
        bar = tqdm(total=reader.image_count, desc="live replay", unit="frame", disable=not progress)
        first_log: int | None = None
        wall0 = time.monotonic()
        for message in reader.messages():
            if not isinstance(message, BagImage):
                continue
            if config.rate > 0:
                first_log = message.stamp_ns if first_log is None else first_log
                due = wall0 + (message.stamp_ns - first_log) / 1e9 / config.rate
                spin_until(lambda due=due: time.monotonic() >= due, max(0.0, due - time.monotonic()) + 1.0)
                clock = Clock()
                clock.clock.sec, clock.clock.nanosec = divmod(message.stamp_ns, 10**9)
                clock_pub.publish(clock)
            msg = _ros_image(message, Image, CompressedImage)
            frame = LiveFrame(message.stamp_ns, time.perf_counter())
            frames[message.stamp_ns] = frame
            order.append(message.stamp_ns)
            pub.publish(msg)
            if config.rate == 0:
                answered = spin_until(lambda f=frame: f.statuses > 0 and (
                    f.keypoints is not None or "BAD_INPUT" in (f.reasons or ())), config.timeout_s)
                if not answered and proc.poll() is not None:
                    break
            bar.update()
        bar.close()
        spin_until(lambda: all(frames[s].statuses for s in order), config.timeout_s)
        seconds = time.perf_counter() - (frames[order[0]].sent_at if order else time.perf_counter())
        spin_until(lambda: False, 0.3)  # a duplicate status would show up here
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
        stderr = _stop(proc, log_path)
        log.close()
        reader.close()
    record_path = _record(out / "live_outputs", recorded) if config.record else None
    run = LiveRun([frames[s] for s in order], seconds, stderr, extra, record_path)
    with (out / "live_frames.jsonl").open("w") as sink:
        for f in run.frames:
            sink.write(json.dumps(finite_only({k: v for k, v in f.__dict__.items() if k != "sent_at"}),
                                  allow_nan=False) + "\n")
    return run


def _ros_image(message: BagImage, Image, CompressedImage):
    if message.compressed:
        msg = CompressedImage(format=message.format, data=message.data)
    else:
        msg = Image(height=message.height, width=message.width, encoding=message.encoding,
                    is_bigendian=int(message.is_bigendian), step=message.step, data=message.data)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(message.stamp_ns, 10**9)
    msg.header.frame_id = message.frame_id
    return msg


def _record(path: Path, messages: list[tuple[str, int, bytes]]) -> Path:
    """The node's outputs as received, in a new MCAP bag (replacing an earlier recording)."""
    import shutil

    from rosbags.rosbag2 import Writer
    from rosbags.rosbag2.enums import StoragePlugin

    shutil.rmtree(path, ignore_errors=True)
    store = replay_typestore()
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {topic: writer.add_connection(topic, kind, typestore=store) for topic, kind in (
            (f"/{NODE_NAME}/status", CERTIFICATION_STATUS), (f"/{NODE_NAME}/keypoints", KEYPOINT_ARRAY))}
        for topic, stamp, data in sorted(messages, key=lambda m: m[1]):
            writer.write(conns[topic], stamp, data)
    return path


def compare_runs(offline: ReplayRun, live: LiveRun) -> dict:
    """The live replay's delivery and its agreement with the offline replay, frame by frame."""
    by_stamp = {r.stamp_ns: r for r in offline.records}
    compared = flag_mismatches = keypoint_mismatches = busy = 0
    worst = 0.0
    for frame in live.frames:
        record = by_stamp.get(frame.stamp_ns)
        if record is None or frame.statuses == 0:
            continue
        compared += 1
        if "NOT_CHECKED" in (frame.reasons or ()) and "NOT_CHECKED" not in record.reasons:
            busy += 1  # the node's prover was busy with an earlier frame (real-time pacing)
        elif frame.certified != record.certified or frame.reasons != record.reasons:
            flag_mismatches += 1
        if (frame.keypoints is None) != (record.keypoints is None):
            keypoint_mismatches += 1
        elif frame.keypoints is not None:
            diff = float(np.abs(np.asarray(frame.keypoints) - np.asarray(record.keypoints)).max())
            worst = max(worst, diff)
            keypoint_mismatches += diff > 1e-4
    latencies = [f.latency_ms for f in live.frames if f.latency_ms is not None]
    answered = sum(f.statuses > 0 for f in live.frames)
    offline.live_latencies_ms = latencies
    return {
        "frames_sent": len(live.frames),
        "statuses_received": sum(f.statuses for f in live.frames),
        "missing_statuses": len(live.frames) - answered,
        "duplicate_statuses": sum(max(0, f.statuses - 1) for f in live.frames) + live.extra_statuses,
        "seconds": live.seconds,
        "frames_per_second": len(live.frames) / live.seconds if live.seconds > 0 else None,
        "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else math.nan,
        "latency_ms_p99": float(np.percentile(latencies, 99)) if latencies else math.nan,
        "recorded_outputs": str(live.recorded) if live.recorded else None,
        "agreement": {"frames_compared": compared, "flag_mismatches": flag_mismatches,
                      "not_checked_live": busy,
                      "keypoint_mismatches": keypoint_mismatches,
                      "flags_identical": flag_mismatches == 0 and compared == len(offline.records),
                      "max_keypoint_difference_px": worst},
    }
