"""Live replay: the real node as a process with the shipped parameters file (SENSOR_DATA
QoS), camera-size frames over DDS: N frames in, N statuses out, equal to offline."""

from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")

from rosbags.highlevel import AnyReader  # noqa: E402

from usn_offline.data import load_split  # noqa: E402
from usn_offline.data.backgrounds import load_backgrounds  # noqa: E402
from usn_offline.replay.bag_writer import BagConfig, make_bag  # noqa: E402
from usn_offline.replay.live import LiveConfig, compare_runs, replay_live  # noqa: E402
from usn_offline.replay.offline import replay_offline  # noqa: E402
from usn_offline.replay.typestore import replay_typestore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "launch" / "usn_keypoint_node.params.yaml"


@pytest.mark.parametrize("width, height, scenarios, frames, rate", [
    (640, 480, ("static+malformed", "moving+dusk", "flash"), 12, 0.0),  # lock-step
    (1280, 720, ("tunnel",), 6, 1.0),  # recorded timing (30 frames/s), /clock, use_sim_time
])
def test_live_replay_through_the_node_matches_offline(tiny_dataset, exported_bundle, tmp_path, width, height,
                                                      scenarios, frames, rate):
    targets = load_split(tiny_dataset, "test")
    bag = tmp_path / "bag"
    summary = make_bag(bag, targets.images, targets.keypoints, load_backgrounds(),
                       BagConfig(scenarios=scenarios, frames_per_scenario=frames, width=width, height=height),
                       progress=False)
    offline = replay_offline(bag, exported_bundle, PARAMS, progress=False)
    live = replay_live(bag, exported_bundle, PARAMS, LiveConfig(rate=rate), tmp_path, progress=False)
    result = compare_runs(offline, live)
    n = summary.frames
    assert result["frames_sent"] == n and result["statuses_received"] == n, live.node_stderr[-2000:]
    assert result["missing_statuses"] == 0 and result["duplicate_statuses"] == 0
    agreement = result["agreement"]
    # Every decision the node made agrees with the offline replay; at recorded timing the
    # node skips frames while its prover is busy (NOT_CHECKED), lock-step it proves all.
    assert agreement["frames_compared"] == n and agreement["flags_identical"], agreement
    assert agreement["not_checked_live"] == 0 if rate == 0 else agreement["not_checked_live"] < n, agreement
    assert agreement["keypoint_mismatches"] == 0 and agreement["max_keypoint_difference_px"] <= 1e-4
    assert sum("BAD_INPUT" in (f.reasons or []) for f in live.frames) == summary.malformed
    # The node's outputs were recorded into a bag that rosbags reads back.
    with AnyReader([live.recorded], default_typestore=replay_typestore()) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts["/usn_keypoint_node/status"] == n
    assert counts["/usn_keypoint_node/keypoints"] == n - summary.malformed
