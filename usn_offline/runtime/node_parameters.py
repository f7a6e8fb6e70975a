"""The node's parameters, one declarative table: name, default, description, range,
choices and whether it is read-only. The node declares, reads and validates its
parameters from it; the shipped parameter file and docs/ROS.md are checked against the
node's declared parameters in the tests. Pure Python (no rclpy), so the replay checks a
parameter file against the same ranges and choices (``StreamSettings.from_params_file``).
"""

from __future__ import annotations

from dataclasses import dataclass

QOS_CHOICES = ("SENSOR_DATA", "DEFAULT", "SYSTEM_DEFAULT")
TRANSPORTS = ("raw", "compressed")
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
MISMATCH_POLICIES = ("fail", "flag")


@dataclass(frozen=True)
class NodeParameter:
    """One parameter. ``default`` None: a string array left unset unless given
    (``trusted_keys``); ``value_range``: inclusive (low, high) for numbers; ``choices``:
    the accepted strings, checked at start."""

    name: str
    default: object
    description: str
    read_only: bool = True
    value_range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None


PARAMETERS: tuple[NodeParameter, ...] = (
    NodeParameter("bundle_dir", "", "deployment bundle directory (model.onnx, certificate.json, ...)"),
    NodeParameter("backend", "auto", f"inference backend: {', '.join(BACKENDS)}", choices=BACKENDS),
    NodeParameter("model_file_path", "", "ONNX model overriding the bundle's (hash-checked)"),
    NodeParameter("engine_file_path", "", "TensorRT engine to use or build (default: cache)"),
    NodeParameter("force_engine_update", False, "rebuild the TensorRT engine even if cached"),
    NodeParameter("enable_fp16", False, "build the TensorRT engine in FP16"),
    NodeParameter("checkpoint_path", "", "torch checkpoint for backend=torch (hash-checked against the "
                  "certificate's)"),
    NodeParameter("input_qos", "SENSOR_DATA", f"image subscription QoS: {', '.join(QOS_CHOICES)}",
                  choices=QOS_CHOICES),
    NodeParameter("input_transport", "raw", "raw: sensor_msgs/Image on 'image'; compressed: "
                  "sensor_msgs/CompressedImage on '<image>/compressed'", choices=TRANSPORTS),
    NodeParameter("input_qos_depth", 5, "image subscription queue depth", value_range=(1, 100)),
    NodeParameter("on_certificate_mismatch", "fail",
                  "fail: refuse to start; flag: serve with every frame flagged uncertified",
                  choices=MISMATCH_POLICIES),
    NodeParameter("trusted_keys", None, "Ed25519 public keys (PEM files, usn-offline keygen); set: the bundle's "
                  "manifest must be signed by one of them"),
    NodeParameter("on_untrusted_bundle", "fail", "with trusted_keys, an unsigned or wrongly signed bundle: "
                  "fail (refuse to start) or flag (serve, every frame CERTIFICATE_MISMATCH)",
                  choices=MISMATCH_POLICIES),
    NodeParameter("max_image_pixels", 4096 * 4096, "larger images are rejected as BAD_INPUT",
                  value_range=(1, 1 << 28)),
    NodeParameter("monitor_z", 2.0, "uncertainty rectangle half-width in standard deviations", read_only=False,
                  value_range=(0.0, 10.0)),
    NodeParameter("monitor_max_saturated_fraction", 0.05, "fraction of clipped pixels flagged SATURATED",
                  read_only=False, value_range=(0.0, 1.0)),
    NodeParameter("monitor_calibration_frames", 0,
                  "use the first N frames that are not flat (nominal light assumed) as the scene's nominal "
                  "statistics; 0: the bundle's", value_range=(0, 10000)),
    NodeParameter("frame_proof", True, "prove each frame's keypoints for the certificate's lighting range "
                  "(needs torch); off: no frame is certified"),
    NodeParameter("frame_proof_max_boxes", 16, "branch-and-bound budget of one frame's proof (boxes)",
                  value_range=(1, 4096)),
    NodeParameter("frame_proof_every", 1, "prove every n-th frame (the others are NOT_CHECKED)",
                  value_range=(1, 1000)),
    NodeParameter("frame_proof_lighting", [0.0, 0.0, 0.0, 0.0], "lighting range the proofs cover: contrast "
                  "min, max, brightness min, max (contrast > 0); all zero: the certificate's box"),
    NodeParameter("monitor_veto", False, "the (a, b) estimate's flags also withhold certification"),
    NodeParameter("scene_check", True, "flag OUT_OF_REGION, without a proof, frames whose contrast no lighting "
                  "of the range can give a scene of contrast scene_std_range"),
    NodeParameter("scene_std_range", [0.0, 0.0], "network-input std (min, max) of the scenes under nominal "
                  "light; zeros: the training images' 1st-99th percentile (from the bundle)"),
    NodeParameter("publish_debug_image", False, "publish ~/debug_image with keypoints and a red border "
                  "when a frame is not certified", read_only=False),
    NodeParameter("diagnostics_period", 1.0, "seconds between /diagnostics messages", value_range=(0.1, 60.0)),
)

# rclpy's own parameters, which a parameter file may set for any node.
RCLPY_PARAMETERS = ("use_sim_time", "start_type_description_service")


def check_value(spec: NodeParameter, value) -> str | None:
    """Why ``value`` is not acceptable for ``spec`` (its range or choices), or None. The
    type is rclpy's to check in the node; here numbers and strings only."""
    if spec.choices is not None and value not in spec.choices:
        return f"parameter {spec.name}={value!r} must be one of {', '.join(spec.choices)}"
    if spec.value_range is not None:
        lo, hi = spec.value_range
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"parameter {spec.name} must be a number, got {value!r}"
        if not lo <= value <= hi:  # NaN too
            return f"parameter {spec.name}={value!r} must be in [{lo:g}, {hi:g}]"
    return None


def unknown_parameters(names) -> list[str]:
    """The names that are neither the node's parameters nor rclpy's, each with the closest
    known name when there is one ("trusted_key (did you mean trusted_keys?)")."""
    import difflib

    known = [spec.name for spec in PARAMETERS]
    unknown = []
    for name in names:
        if name in known or name in RCLPY_PARAMETERS or name.startswith("qos_overrides."):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        unknown.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return unknown
