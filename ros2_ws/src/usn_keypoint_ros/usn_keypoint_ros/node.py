"""The certified keypoint node: ROS glue only (parameters, QoS, messages, diagnostics).

Decoding, preprocessing, inference and the decision are the modules of
``usn_offline.runtime``, shared with the rosbag replay; the per-frame proofs
(``usn_offline.certify.frame``) need torch, and without it every frame is NOT_CHECKED.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import ParameterException, ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, qos_profile_sensor_data, qos_profile_system_default
from sensor_msgs.msg import CompressedImage, Image
from usn_keypoint_msgs.msg import CertificationStatus, Keypoint2D, KeypointArray

from usn_offline.errors import BundleError, UsnError
from usn_offline.runtime.backends import create_backend, deployed_bundle
from usn_offline.runtime.bundle import CERTIFICATE, Bundle
from usn_offline.runtime.hashing import sha256_file
from usn_offline.runtime.monitor import MonitorResult, PhotometricMonitor, Reason
from usn_offline.runtime.node_parameters import PARAMETERS, NodeParameter, check_value, unknown_parameters
from usn_offline.runtime.pipeline import FrameResult, KeypointPipeline, bad_input
from usn_offline.runtime.proof_process import ProofProcess, ProofProcessError, torch_available
from usn_offline.runtime.scene_check import make_scene_check
from usn_offline.runtime.stream import FrameStream


class StartupError(Exception):
    """The node cannot start; the message says why."""


def _descriptor(spec: NodeParameter) -> ParameterDescriptor:
    ranges = {}
    if spec.value_range is not None:
        lo, hi = spec.value_range
        if isinstance(spec.default, float):
            ranges["floating_point_range"] = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
        else:
            ranges["integer_range"] = [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]
    return ParameterDescriptor(description=spec.description, read_only=spec.read_only, **ranges)


class KeypointNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("usn_keypoint_node", **kwargs)
        for spec in PARAMETERS:
            try:
                if spec.default is None:  # typed and unset unless given
                    self.declare_parameter(spec.name, Parameter.Type.STRING_ARRAY, _descriptor(spec))
                else:
                    self.declare_parameter(spec.name, spec.default, _descriptor(spec))
            except ParameterException as exc:  # a value of the wrong type or outside its range
                hint = " (floating-point parameters take 1.0, not 1)" if "DOUBLE" in str(exc) else ""
                raise StartupError(f"parameter {spec.name}: {exc}{hint}") from None
        unknown = unknown_parameters(getattr(self, "_parameter_overrides", {}))
        if unknown:  # ROS nodes ignore them; say so, since a misspelt trusted_keys would go unnoticed
            self.get_logger().warning(f"unknown parameter(s) ignored: {', '.join(unknown)}")
        self._validate_start()

        p = self._params()
        try:
            self.bundle = Bundle.load(p["bundle_dir"])
        except UsnError as exc:
            raise StartupError(str(exc)) from exc
        self.certificate_id = sha256_file(self.bundle.root / CERTIFICATE)
        matches, mismatch = True, "certificate does not match the model"
        if not self._signature_trusted(p):
            matches, mismatch = False, "the bundle's signature is not from a trusted key"
        model_path, expected_sha256 = self.bundle.onnx_path, self.bundle.model_sha256
        if p["model_file_path"]:
            model_path = p["model_file_path"]
            if not self._certified_file(p, "model_file_path", "model", self.bundle.model_sha256):
                matches, mismatch, expected_sha256 = False, "certificate does not match the model", None
        any_checkpoint = False
        if p["backend"] == "torch" and p["checkpoint_path"] and not self._certified_file(
                p, "checkpoint_path", "checkpoint", self.bundle.certificate.get("checkpoint_sha256")):
            matches, mismatch, any_checkpoint = False, "certificate does not match the model", True
        try:
            self.backend = create_backend(p["backend"], self.bundle, model_path=model_path,
                                          engine_path=p["engine_file_path"] or None,
                                          force_engine_update=p["force_engine_update"], fp16=p["enable_fp16"],
                                          checkpoint_path=p["checkpoint_path"] or None,
                                          expected_sha256=expected_sha256, any_checkpoint=any_checkpoint)
        except UsnError as exc:
            raise StartupError(str(exc)) from exc
        self.bundle = deployed_bundle(self.bundle, self.backend)  # an engine built here: its own gap
        self.get_logger().info(f"backend: {self.backend.name}; certified region "
                               f"{[(b.a_lo, b.a_hi, b.b_lo, b.b_hi) for b in self.bundle.region]}, "
                               f"delta {self.bundle.effective_delta_px:.4f} px")
        self.monitor = PhotometricMonitor(self.bundle.region, self.bundle.nominal, p["monitor_z"],
                                          p["monitor_max_saturated_fraction"])
        try:
            box = self.bundle.lighting_range(tuple(float(v) for v in p["frame_proof_lighting"]))
            scene = make_scene_check(self.bundle, p["scene_check"], box,
                                     tuple(float(v) for v in p["scene_std_range"]))
        except UsnError as exc:
            raise StartupError(str(exc)) from exc
        first = self.bundle.region[0]
        if p["frame_proof"] and (box.a_lo > first.a_lo or box.a_hi < first.a_hi or box.b_lo > first.b_lo
                                 or box.b_hi < first.b_hi):
            # A narrower range is a weaker promise (each status states it in lighting_range):
            # say so once, where an operator reads, rather than only in every message.
            self.get_logger().warning(
                f"frame proofs cover lighting a in [{box.a_lo:g}, {box.a_hi:g}], b in [{box.b_lo:g}, {box.b_hi:g}] "
                f"(frame_proof_lighting), narrower than the certificate's a in [{first.a_lo:g}, {first.a_hi:g}], "
                f"b in [{first.b_lo:g}, {first.b_hi:g}]")
        if scene is not None:
            self.get_logger().info(f"scene check: frames whose contrast no lighting a in [{box.a_lo:g}, {box.a_hi:g}], "
                                   f"b in [{box.b_lo:g}, {box.b_hi:g}] can give from a scene of "
                                   f"std [{scene.min_std:.4f}, {scene.max_std:.4f}] are OUT_OF_REGION")
        verifier = self._verifier(p) if p["frame_proof"] else None
        self.pipeline = KeypointPipeline(self.bundle, self.backend, self.monitor, matches, p["max_image_pixels"],
                                         verifier=verifier, prove_every=p["frame_proof_every"],
                                         monitor_veto=p["monitor_veto"], scene_check=scene,
                                         mismatch_detail=mismatch)
        self.lighting_range = [box.a_lo, box.a_hi, box.b_lo, box.b_hi]
        self.stream = FrameStream(self.pipeline, p["monitor_calibration_frames"])
        self.declare_parameter("keypoint_names", list(self.bundle.keypoint_names),
                               ParameterDescriptor(description="names of the keypoint ids", read_only=True))

        qos = {"SENSOR_DATA": qos_profile_sensor_data, "SYSTEM_DEFAULT": qos_profile_system_default,
               "DEFAULT": QoSProfile(depth=10)}[p["input_qos"]]
        qos = QoSProfile(history=qos.history, depth=p["input_qos_depth"], reliability=qos.reliability,
                         durability=qos.durability)
        self.keypoint_pub = self.create_publisher(KeypointArray, "~/keypoints", 10)
        self.status_pub = self.create_publisher(CertificationStatus, "~/status", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.debug_pub = self.create_publisher(Image, "~/debug_image", 2)
        if p["input_transport"] == "compressed":
            # image_transport's convention: <remapped image topic>/compressed.
            topic = self.resolve_topic_name("image") + "/compressed"
            self.image_sub = self.create_subscription(CompressedImage, topic, self.on_image, qos)
        else:
            self.image_sub = self.create_subscription(Image, "image", self.on_image, qos)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.frames = self.flagged = self.bad = self.not_checked = 0
        self._stats_lock = threading.Lock()
        # Proofs run one at a time in the low-priority proof process; this thread only
        # waits for its answers. A frame arriving while it is busy gets its keypoints and
        # a NOT_CHECKED status at once, so the node keeps the camera's rate and proves as
        # many frames as the spare CPU allows.
        self._prover = ThreadPoolExecutor(1, "frame_proof") if verifier is not None else None
        self._proof_busy = False
        self.latencies: deque[float] = deque(maxlen=200)
        self.arrivals: deque[float] = deque(maxlen=200)
        self.create_timer(p["diagnostics_period"], self.publish_diagnostics)

    # -- parameters ---------------------------------------------------------------------------
    def _value(self, name: str):
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:  # a typed parameter left unset (trusted_keys)
            return None

    def _params(self) -> dict:
        return {spec.name: self._value(spec.name) for spec in PARAMETERS}

    def _certified_file(self, p: dict, parameter: str, what: str, recorded: str | None) -> bool:
        """Whether the file a parameter names to serve is the one the certificate was issued
        for (SHA-256); when it is not: refuse to start, or (on_certificate_mismatch flag)
        say that every frame is flagged."""
        path = p[parameter]
        if not Path(path).is_file():
            raise StartupError(f"{parameter} {path}: no such file")
        if sha256_file(path) == recorded:
            return True
        if p["on_certificate_mismatch"] == "fail":
            raise StartupError(f"{path} is not the {what} the certificate was issued for (SHA-256 mismatch); set "
                               "on_certificate_mismatch:=flag to serve uncertified")
        self.get_logger().error(f"{what} does not match the certificate: every frame is flagged")
        return False

    def _signature_trusted(self, p: dict) -> bool:
        """With trusted_keys: is the bundle signed by one of them? (fail policy: refuse)."""
        keys = p["trusted_keys"] or []
        if any(not k.strip() for k in keys):
            # e.g. an unset variable substituted into a launch file: never read as "no keys"
            raise StartupError(f"trusted_keys {keys!r} has an empty entry")
        if not keys:
            self.get_logger().warning("bundle signature not checked: no trusted_keys configured")
            return True
        from usn_offline.runtime.signing import verify_manifest

        try:
            key = verify_manifest(self.bundle.root, keys)
        except BundleError as exc:
            if p["on_untrusted_bundle"] == "fail":
                raise StartupError(f"{exc} (on_untrusted_bundle:=flag serves it uncertified)") from exc
            self.get_logger().error(f"{exc}: serving with every frame flagged CERTIFICATE_MISMATCH")
            return False
        except UsnError as exc:  # a missing or malformed key file, no cryptography package
            raise StartupError(str(exc)) from exc
        self.get_logger().info(f"bundle signed by trusted key {key[:16]}...")
        return True

    def _verifier(self, p: dict) -> ProofProcess | None:
        """The per-frame prover: a child process of its own (runtime/proof_process.py), so
        proofs never hold this process's interpreter lock while a frame is being served."""
        if not torch_available():
            self.get_logger().warning("per-frame proofs need torch, which is not installed: every frame is "
                                      "NOT_CHECKED")
            return None
        try:
            verifier = ProofProcess(self.bundle, p["frame_proof_max_boxes"],
                                    tuple(float(v) for v in p["frame_proof_lighting"]))
        except ProofProcessError as exc:
            raise StartupError(f"cannot prove frames for this bundle: {exc}") from exc
        self.get_logger().info(f"per-frame proofs in process {verifier.pid}: {verifier.description}")
        return verifier

    def _validate_start(self) -> None:
        p = self._params()
        if not p["bundle_dir"]:
            raise StartupError("parameter bundle_dir is required (the export bundle directory)")
        for spec in PARAMETERS:  # rclpy checked the ranges as it declared them; the choices are ours
            problem = check_value(spec, p[spec.name])
            if problem is not None:
                raise StartupError(problem)

    def _on_set_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == "monitor_z":
                self.monitor.z = float(param.value)
            elif param.name == "monitor_max_saturated_fraction":
                self.monitor.max_saturated_fraction = float(param.value)
        return SetParametersResult(successful=True)

    # -- per frame ----------------------------------------------------------------------------
    def on_image(self, msg: Image | CompressedImage) -> None:
        started = time.perf_counter()
        try:
            self._on_image(msg, started)
        except Exception as exc:  # a bug must not stop the node: the frame still gets a status
            self.get_logger().error(f"frame not served: {type(exc).__name__}: {exc}", throttle_duration_sec=5.0)
            result = FrameResult(None, bad_input(f"internal error: {type(exc).__name__}: {exc}"))
            try:
                self._publish_decision(msg, result, started)
            except Exception as again:
                self.get_logger().error(f"no status for the frame: {type(again).__name__}: {again}")

    def _on_image(self, msg: Image | CompressedImage, started: float) -> None:
        self.arrivals.append(time.monotonic())
        was_calibrating = self.stream.calibrating
        prove = "now" if self._prover is None else "busy" if self._proof_busy else "later"
        # The payload is read in place (no copy of the frame); msg outlives the frame's use.
        if isinstance(msg, CompressedImage):
            result = self.stream.process_compressed(msg.format, memoryview(msg.data), prove)
        else:
            result = self.stream.process_raw(msg.height, msg.width, msg.encoding, bool(msg.is_bigendian), msg.step,
                                             memoryview(msg.data), prove)
        if was_calibrating and not self.stream.calibrating:
            self.get_logger().info(f"{result.status.detail}: {self.monitor.nominal}")
        if Reason.BAD_INPUT in result.status.reasons:
            self.get_logger().warning(f"BAD_INPUT: {result.status.detail}", throttle_duration_sec=5.0)
        if result.keypoints_px is not None:
            self.keypoint_pub.publish(self._keypoints_msg(msg, result))
        if result.pending is not None:
            self._proof_busy = True
            self._prover.submit(self._prove, msg, result, started)
        else:
            self._publish_decision(msg, result, started)

    def _prove(self, msg: Image | CompressedImage, result: FrameResult, started: float) -> None:
        """On the prover thread: complete the frame's decision and publish its status."""
        try:
            try:
                self.pipeline.finish(result)
            finally:
                # Free before publishing: a lock-step sender's next frame may follow the
                # status within microseconds and must find the prover idle.
                self._proof_busy = False
        except Exception as exc:  # a bug: the frame still gets its (uncertified) status
            self.get_logger().error(f"frame proof failed: {type(exc).__name__}: {exc}")
            result.pending = None
            result.status.reasons = [Reason.NOT_PROVED] + ([] if self.pipeline.certificate_matches
                                                           else [Reason.CERTIFICATE_MISMATCH])
            result.status.detail = f"internal error while proving: {type(exc).__name__}: {exc}"
        try:
            self._publish_decision(msg, result, started)
        except Exception as exc:  # shutting down
            self.get_logger().error(f"no status for the frame: {type(exc).__name__}: {exc}")

    def _publish_decision(self, msg: Image | CompressedImage, result: FrameResult, started: float) -> None:
        with self._stats_lock:
            self.frames += 1
            self.flagged += not result.certified
            self.bad += Reason.BAD_INPUT in result.status.reasons
            self.not_checked += Reason.NOT_CHECKED in result.status.reasons
        self.status_pub.publish(self._status_msg(msg, result))
        self.latencies.append(time.perf_counter() - started)
        if self.get_parameter("publish_debug_image").value and result.keypoints_px is not None:
            try:
                self.debug_pub.publish(self._debug_msg(msg, result.frame, result))
            except Exception as exc:  # a picture for people: never at the cost of the node
                self.get_logger().warning(f"no debug image: {type(exc).__name__}: {exc}", throttle_duration_sec=5.0)

    def destroy_node(self) -> None:
        prover = getattr(self, "_prover", None)  # None too when the start-up failed early
        if prover is not None:
            prover.shutdown(wait=True)  # the frame being proved still gets its status
            self.pipeline.verifier.close()
        super().destroy_node()

    def _keypoints_msg(self, image: Image, result: FrameResult) -> KeypointArray:
        msg = KeypointArray(header=image.header, model_sha256=self.bundle.model_sha256)
        msg.keypoints = [Keypoint2D(id=i, x=float(x), y=float(y), score=math.nan)
                         for i, (x, y) in enumerate(result.keypoints_px)]
        return msg

    def _status_msg(self, image: Image, result: FrameResult) -> CertificationStatus:
        status: MonitorResult = result.status
        h, w = self.bundle.preprocess.input_height, self.bundle.preprocess.input_width
        frame = result.frame
        sy, sx = (math.nan, math.nan) if frame is None else (frame.shape[0] / h, frame.shape[1] / w)
        gap, proven = self.bundle.deployment_gap_px, status.proven_deviation_px
        allowed = math.nan if proven is None or not result.certified else proven + gap
        return CertificationStatus(
            header=image.header, certified=result.certified, lighting_range=self.lighting_range,
            delta_x_px=self.bundle.effective_delta_px * sx, delta_y_px=self.bundle.effective_delta_px * sy,
            proven_x_px=allowed * sx, proven_y_px=allowed * sy, contrast=status.contrast,
            brightness=status.brightness, contrast_stddev=status.contrast_stddev,
            brightness_stddev=status.brightness_stddev, margin=status.margin,
            saturated_fraction=status.saturated_fraction,
            reasons=[int(r) for r in status.reasons], detail=status.detail, certificate_id=self.certificate_id)

    def _debug_msg(self, image: Image, frame: np.ndarray, result: FrameResult) -> Image:
        vis = frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        vis = cv2.normalize(vis[:, :, :3], None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        height, width = vis.shape[:2]
        for x, y in result.keypoints_px:
            if -0.5 <= x < width and -0.5 <= y < height:  # keypoints off the image are not drawn
                cv2.circle(vis, (int(round(x)), int(round(y))), 4, (0, 255, 0), -1)
        if not result.certified:
            cv2.rectangle(vis, (0, 0), (vis.shape[1] - 1, vis.shape[0] - 1), (255, 0, 0), 6)
        return Image(header=image.header, height=vis.shape[0], width=vis.shape[1], encoding="rgb8",
                     is_bigendian=0, step=vis.shape[1] * 3, data=vis.tobytes())

    # -- diagnostics --------------------------------------------------------------------------
    def publish_diagnostics(self) -> None:
        now = time.monotonic()
        recent = [t for t in self.arrivals if now - t <= 5.0]
        rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        latency = 1e3 * float(np.mean(self.latencies)) if self.latencies else 0.0
        flagged = self.flagged / self.frames if self.frames else 0.0
        level = DiagnosticStatus.OK
        message = "serving certified keypoints"
        if self.frames == 0:
            level, message = DiagnosticStatus.WARN, "no images received yet"
        elif flagged > 0.5:
            level, message = DiagnosticStatus.WARN, f"{100 * flagged:.0f} % of frames not certified"
        status = DiagnosticStatus(level=level, name="usn_keypoint_node: certified keypoints", message=message,
                                  hardware_id=self.bundle.model_sha256[:16])
        status.values = [KeyValue(key=k, value=v) for k, v in (
            ("frames", str(self.frames)), ("input_rate_hz", f"{rate:.2f}"), ("mean_latency_ms", f"{latency:.3f}"),
            ("flagged_fraction", f"{flagged:.4f}"), ("bad_input_frames", str(self.bad)),
            ("not_checked_frames", str(self.not_checked)),
            ("backend", self.backend.name), ("certificate_id", self.certificate_id))]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(array)


def main(args=None) -> int:
    rclpy.init(args=args)
    try:
        node = KeypointNode()
    except StartupError as exc:
        print(f"usn_keypoint_node: error: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        rclpy.try_shutdown()
        return 0
    except Exception:
        # SIGINT/SIGTERM while the node was still being built shut its context down under
        # it (rclpy then fails to create the next publisher): a stop, not an error.
        if not rclpy.ok():
            return 0
        raise
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        # Ctrl-C under `ros2 launch` reaches the node twice (the terminal's process group
        # and the SIGINT launch forwards): the second must not interrupt the clean-up.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
