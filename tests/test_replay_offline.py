"""Offline replay of generated bags through the node's runtime: the counts the scenario
generator implies, the report files, and bags that end early."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from usn_offline.data import load_split
from usn_offline.data.backgrounds import load_backgrounds
from usn_offline.replay.bag_writer import BagConfig, make_bag
from usn_offline.replay.offline import replay_offline
from usn_offline.replay.records import summarise
from usn_offline.replay.report import build_report, write_report
from usn_offline.replay.scenarios import Scenario
from usn_offline.runtime.bundle import Bundle

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "launch" / "usn_keypoint_node.params.yaml"
SCENARIOS = ("static+malformed", "lens_cap", "flash", "dusk", "tunnel")
FRAMES = 20


@pytest.fixture(scope="module")
def scenario_bag(tiny_dataset, tmp_path_factory):
    targets = load_split(tiny_dataset, "test")
    out = tmp_path_factory.mktemp("replay") / "bag"
    make_bag(out, targets.images, targets.keypoints, load_backgrounds(),
             BagConfig(scenarios=SCENARIOS, frames_per_scenario=FRAMES), progress=False)
    return out


@pytest.fixture(scope="module")
def offline_run(scenario_bag, exported_bundle, tmp_path_factory):
    frames = tmp_path_factory.mktemp("replay_out") / "frames.jsonl"
    return replay_offline(scenario_bag, exported_bundle, PARAMS, frames_out=frames, progress=False), frames


def _recipes():
    return [Scenario.parse(name).frame(i, FRAMES) for name in SCENARIOS for i in range(FRAMES)]


def test_replay_gives_the_counts_the_generator_implies(offline_run, exported_bundle):
    run, _ = offline_run
    bundle = Bundle.load(exported_bundle)
    recipes = _recipes()
    assert run.complete and run.has_truth and len(run.records) == len(recipes) == 100
    for record, recipe in zip(run.records, recipes, strict=True):
        assert record.scenario == recipe.scenario
        assert (record.true_contrast, record.true_brightness) == (recipe.contrast, recipe.brightness)
        assert record.malformed == (recipe.malformed is not None)
        assert record.in_region == bundle.region[0].contains(recipe.contrast, recipe.brightness)
        bad = "BAD_INPUT" in record.reasons
        assert bad == record.malformed, (record.index, record.reasons)
        assert (record.keypoints is None) == bad and (record.moved is None) == bad
        if recipe.contrast == 0.0:  # lens cap: far too flat for any lighting of the range
            assert not record.certified and record.reasons == ("OUT_OF_REGION",)
        if recipe.contrast == 1.8:  # the flash clips most of the frame: no proof, or too contrasty
            assert not record.certified and record.reasons in (("NOT_PROVED",), ("OUT_OF_REGION",))
        if record.certified and record.in_region:  # the promise: proved frames inside the range hold
            assert not record.moved, record
        if (recipe.contrast, recipe.brightness) == (1.0, 0.0) and not bad:  # the frame is its nominal frame
            assert record.deviation_ratio < 1e-3 and not record.moved
        if record.moved is not None:
            assert record.moved == (record.deviation_ratio > 1.0)
            assert record.error_px is not None and record.error_px < 400
    overall = summarise(run.records)
    malformed = sum(r.malformed is not None for r in recipes)
    assert malformed == 2
    assert overall["malformed_frames"] == overall["malformed_detected"] == overall["bad_input_frames"] == malformed
    assert overall["unexpected_bad_input"] == 0
    assert overall["in_region_frames"] == sum(bundle.region[0].contains(r.contrast, r.brightness) for r in recipes)
    judged = [r for r in run.records if r.moved is not None]
    certified = [r for r in judged if r.certified]
    moved = [r for r in judged if r.moved]
    assert overall["judged_frames"] == len(judged) == 98
    assert overall["silent_failures"] == sum(r.moved for r in certified)
    assert overall["silent_failures_in_range"] == 0  # the promise (proved frames in the range hold)
    assert overall["silent_failures_outside_range"] == overall["silent_failures"]
    in_range = [r for r in judged if r.in_region]
    assert overall["certified_fraction_in_range"] == (sum(r.certified for r in in_range) / len(in_range)
                                                      if in_range else None)
    assert overall["failure_recall"] == (sum(not r.certified for r in moved) / len(moved) if moved else None)


def test_report_files_and_keys(offline_run, scenario_bag, exported_bundle, tmp_path):
    run, frames = offline_run
    report = build_report(run, scenario_bag, Bundle.load(exported_bundle), PARAMS)
    files = write_report(tmp_path, report, run)
    assert {f.name for f in files} == {"report.json", "summary.md", "timeline.png", "deviation.png", "latency.png",
                                       "confusion.png"}
    doc = json.loads((tmp_path / "report.json").read_text())
    for key in ("frames", "certified_fraction", "silent_failures", "silent_failure_rate", "failure_recall",
                "false_alarm_rate", "latency_ms_p50", "latency_ms_p99"):
        assert key in doc["overall"] and all(key in s for s in doc["scenarios"].values())
    assert list(doc["scenarios"]) == list(SCENARIOS)
    assert doc["delta_image_px"] == [{"frame": [640, 480], "x": pytest.approx(10 * doc["bundle"]["effective_delta_px"]),
                                      "y": pytest.approx(7.5 * doc["bundle"]["effective_delta_px"])}]
    assert sum(doc["confusion"].values()) == doc["overall"]["judged_frames"]
    lines = frames.read_text().splitlines()
    assert len(lines) == 100 and json.loads(lines[0])["scenario"] == "static+malformed"
    assert "| **all** | 100 |" in (tmp_path / "summary.md").read_text()


def test_in_range_means_the_range_the_proofs_cover(scenario_bag, exported_bundle, tmp_path):
    """With ``frame_proof_lighting`` narrower than the certificate's box, a frame is in range
    when its true lighting lies in what the per-frame decisions cover, and the report says
    which range that is (it used to count the certificate's region)."""
    text = PARAMS.read_text()
    assert "frame_proof_lighting: [0.0, 0.0, 0.0, 0.0]" in text and "frame_proof: true" in text
    narrow = (0.97, 1.03, -0.01, 0.01)
    params = tmp_path / "params.yaml"
    params.write_text(text.replace("frame_proof_lighting: [0.0, 0.0, 0.0, 0.0]",
                                   f"frame_proof_lighting: {list(narrow)}").replace("frame_proof: true",
                                                                                   "frame_proof: false"))
    run = replay_offline(scenario_bag, exported_bundle, params, progress=False)
    bundle = Bundle.load(exported_bundle)
    inside = [a <= r.contrast <= b and c <= r.brightness <= d for r in _recipes() for a, b, c, d in [narrow]]
    assert [r.in_region for r in run.records] == inside
    wider = [bundle.region[0].contains(r.contrast, r.brightness) for r in _recipes()]
    assert sum(wider) > sum(inside) > 0
    report = build_report(run, scenario_bag, bundle, params)
    assert report["proof_range"] == list(narrow) and report["overall"]["in_region_frames"] == sum(inside)
    assert "per-frame proofs (and *in range*) cover a ∈ [0.97, 1.03], b ∈ [-0.01, 0.01]" in \
        write_report(tmp_path / "out", report, run)[1].read_text()


def test_replay_is_deterministic(offline_run, scenario_bag, exported_bundle):
    again = replay_offline(scenario_bag, exported_bundle, PARAMS, progress=False)
    first, _ = offline_run
    for a, b in zip(first.records, again.records, strict=True):
        assert (a.certified, a.reasons, a.keypoints, a.deviation_ratio) == (b.certified, b.reasons, b.keypoints,
                                                                            b.deviation_ratio)


def test_truncated_bag_keeps_a_partial_report(scenario_bag, exported_bundle, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(scenario_bag, cut)
    mcap = next(cut.glob("*.mcap"))
    os.truncate(mcap, int(mcap.stat().st_size * 0.6))
    out = tmp_path / "report"
    # The shipped parameters without per-frame proofs: this test is about the bag's end.
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("frame_proof: true", "frame_proof: false"))
    proc = subprocess.run([sys.executable, "-m", "usn_offline.cli", "replay", "--bag", str(cut), "--bundle",
                           str(exported_bundle), "--out", str(out), "--quiet", "--no-plots", "--params", str(params)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the bag ended early" in proc.stdout
    doc = json.loads((out / "report.json").read_text())
    assert not doc["complete"] and "ends early" in doc["problem"]
    assert 10 < doc["frames_replayed"] < 100 and doc["overall"]["frames"] == doc["frames_replayed"]
    assert len((out / "frames.jsonl").read_text().splitlines()) == doc["frames_replayed"]
    reasons = doc["overall"]["reasons"]  # no proofs: each frame is NOT_CHECKED, or too dark for the range
    assert reasons.get("NOT_CHECKED") + reasons.get("OUT_OF_REGION", 0) == (doc["frames_replayed"]
                                                                           - doc["overall"]["bad_input_frames"])


def test_replay_cli_errors(exported_bundle, scenario_bag, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "usn_offline.cli", "replay", *args], capture_output=True,
                              text=True, timeout=120)

    missing = run("--bag", str(tmp_path / "nope"), "--bundle", str(exported_bundle), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "usn-offline: error: bag not found" in missing.stderr
    topic = run("--bag", str(scenario_bag), "--bundle", str(exported_bundle), "--out", str(tmp_path / "o"),
                "--image-topic", "/camera/other")
    assert topic.returncode == 2 and "no topic '/camera/other' (topics: /camera/image_raw" in topic.stderr
    params = tmp_path / "params.yaml"
    params.write_text("usn_keypoint_node:\n  ros__parameters:\n    monitor_z: fast\n")
    bad = run("--bag", str(scenario_bag), "--bundle", str(exported_bundle), "--out", str(tmp_path / "o"),
              "--params", str(params))
    assert bad.returncode == 2 and "parameter monitor_z must be a float, got 'fast'" in bad.stderr
    assert np.all([len(p.stderr.strip().splitlines()) == 1 for p in (missing, topic, bad)])
    assert not (tmp_path / "o").exists()  # the folder it made for a report that never came is gone
    mine = tmp_path / "mine"
    mine.mkdir()
    assert run("--bag", str(tmp_path / "nope"), "--bundle", str(exported_bundle), "--out", str(mine)).returncode == 2
    assert mine.is_dir()  # one it did not make stays


def _user_bag(path, frames):
    """A bag as a user records it: bgr8 images and their JPEG copies, no ground truth."""
    import cv2
    from rosbags.rosbag2 import Writer

    from usn_offline.replay.typestore import COMPRESSED_IMAGE, IMAGE, replay_typestore

    store = replay_typestore()
    Image, Compressed = store.types[IMAGE], store.types[COMPRESSED_IMAGE]
    Header, Time = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
    with Writer(path, version=9) as writer:  # sqlite3, rosbag2's default before Iron
        raw = writer.add_connection("/cam/image", IMAGE, typestore=store)
        jpeg = writer.add_connection("/cam/image/compressed", COMPRESSED_IMAGE, typestore=store)
        for i, frame in enumerate(frames):
            header = Header(stamp=Time(sec=100 + i, nanosec=0), frame_id="cam")
            bgr = np.ascontiguousarray(frame[:, :, ::-1])
            writer.write(raw, (100 + i) * 10**9, store.serialize_cdr(Image(
                header=header, height=bgr.shape[0], width=bgr.shape[1], encoding="bgr8", is_bigendian=0,
                step=bgr.shape[1] * 3, data=np.frombuffer(bgr.tobytes(), np.uint8)), IMAGE))
            ok, buf = cv2.imencode(".jpg", bgr)
            writer.write(jpeg, (100 + i) * 10**9, store.serialize_cdr(Compressed(
                header=header, format="jpeg", data=buf.reshape(-1)), COMPRESSED_IMAGE))


def test_a_users_bag_without_ground_truth(tmp_path, exported_bundle, tiny_dataset):
    test = load_split(tiny_dataset, "test")
    frames = [np.repeat(np.rint(255 * img)[:, :, None], 3, 2).astype(np.uint8) for img in test.images[:6]]
    frames = [np.kron(f, np.ones((5, 5, 1), np.uint8)) for f in frames]  # 320x320
    bag = tmp_path / "user_bag"
    _user_bag(bag, frames)
    for topic in ("/cam/image", "/cam/image/compressed"):
        run = replay_offline(bag, exported_bundle, PARAMS, image_topic=topic, progress=False)
        assert run.complete and not run.has_truth and len(run.records) == 6
        assert all(r.scenario is None and r.moved is None and r.keypoints is not None for r in run.records)
        assert [r.stamp_ns for r in run.records] == [(100 + i) * 10**9 for i in range(6)]
        report = build_report(run, bag, Bundle.load(exported_bundle), PARAMS)
        assert report["overall"]["frames"] == 6 and "silent_failures" not in report["overall"]
        assert list(report["scenarios"]) == ["(no ground truth)"]
        files = write_report(tmp_path / topic.replace("/", "_"), report, run)
        assert "has no ground truth" in files[1].read_text() and not any(f.name == "confusion.png" for f in files)
    # Raw and JPEG agree to within JPEG's loss on 320x320 frames.
    raw = replay_offline(bag, exported_bundle, PARAMS, image_topic="/cam/image", progress=False)
    assert np.abs(np.array(raw.records[0].keypoints) - np.array(run.records[0].keypoints)).max() < 10


def test_scene_check_on_the_bag_is_sound_and_catches_the_tunnel(offline_run, scenario_bag, exported_bundle):
    """Against the bag's own nominal images: a frame flagged by the scene check while its
    true lighting is in the range must come from a scene outside the assumed contrast
    (the check's only assumption); the tunnel's dark frames (contrast 0.35) are caught."""
    from usn_offline.replay.bag_reader import BagReader, BagTruth
    from usn_offline.runtime.image_decode import decode_compressed
    from usn_offline.runtime.preprocess import preprocess

    run, _ = offline_run
    bundle = Bundle.load(exported_bundle)
    low, high = bundle.nominal.low_std, bundle.nominal.high_std
    with BagReader(scenario_bag) as reader:
        truths = [m for m in reader.messages() if isinstance(m, BagTruth)]
    assert len(truths) == len(run.records)
    tunnel_dark = 0
    for record, truth in zip(run.records, truths, strict=True):
        nominal = preprocess(decode_compressed(truth.nominal_format, truth.nominal_data, 1 << 24), bundle.preprocess)
        flagged = "OUT_OF_REGION" in record.reasons
        if flagged and record.in_region:
            assert not low <= float(nominal.std()) <= high, (record.index, float(nominal.std()), low, high)
        if record.scenario == "tunnel" and record.true_contrast < 0.5:
            tunnel_dark += 1
            # Its frame's std is 0.35 that of the scene, give or take the brightness
            # change's clipping (< 0.03) and rounding: far below what the range allows.
            if 0.35 * float(nominal.std()) + 0.035 < bundle.region[0].a_lo * low:
                assert flagged, record
    assert tunnel_dark > 0


def _rewrite(src: Path, dst: Path, edit) -> None:
    """A copy of bag ``src`` at ``dst`` with ``edit(store, messages)`` applied to its
    (topic, type, log time, raw) messages, as a recorder with other habits would write it."""
    from rosbags.rosbag2 import Reader, Writer

    from usn_offline.replay.typestore import replay_typestore

    store = replay_typestore()
    with Reader(src) as reader:
        messages = [(c.topic, c.msgtype, t, raw) for c, t, raw in reader.messages()]
    with Writer(dst, version=9) as writer:
        connections = {}
        for topic, kind, t, raw in sorted(edit(store, messages), key=lambda m: m[2]):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, kind, typestore=store)
            writer.write(connections[topic], t, raw)


@pytest.fixture(scope="module")
def small_replay(tiny_dataset, exported_bundle, tmp_path_factory):
    """A 12-frame bag, its replay (no per-frame proofs: pairing and counting only), and the
    parameters used."""
    root = tmp_path_factory.mktemp("small_replay")
    targets = load_split(tiny_dataset, "test")
    bag = root / "bag"
    make_bag(bag, targets.images, targets.keypoints, load_backgrounds(),
             BagConfig(scenarios=("static", "dusk"), frames_per_scenario=6, width=160, height=120), progress=False)
    params = root / "params.yaml"
    params.write_text("usn_keypoint_node:\n  ros__parameters:\n    frame_proof: false\n")
    return bag, replay_offline(bag, exported_bundle, params, progress=False), params


def _same_frames(got, want) -> None:
    assert [r.index for r in got.records] == list(range(len(want.records)))
    for g, w in zip(got.records, want.records, strict=True):
        assert (g.scenario, g.keypoints, g.error_px, g.true_contrast) == (w.scenario, w.keypoints, w.error_px,
                                                                         w.true_contrast), g.index


def test_frames_sharing_a_stamp_with_their_truth_logged_later_are_all_replayed(small_replay, exported_bundle,
                                                                               tmp_path):
    """A driver that stamps two frames alike, a recorder that logs the truth half a second
    late: each image used to overwrite the other waiting under their stamp (half the
    frames gone without a word, the rest misnumbered). Pairs are now matched in log order."""
    bag, plain, params = small_replay
    times = sorted({t for _, _, t, _ in _messages(bag)})

    def shared_stamps_late_truth(store, messages):
        out = []
        for topic, kind, t, raw in messages:
            if kind != "rosgraph_msgs/msg/Clock":
                msg = store.deserialize_cdr(raw, kind)
                i = times.index(t)
                stamp = times[i - i % 2]
                msg.header.stamp.sec, msg.header.stamp.nanosec = stamp // 10**9, stamp % 10**9
                raw = store.serialize_cdr(msg, kind)
                t += 500_000_000 if kind.endswith("FrameTruth") else 0
            out.append((topic, kind, t, raw))
        return out

    variant = tmp_path / "variant"
    _rewrite(bag, variant, shared_stamps_late_truth)
    run = replay_offline(variant, exported_bundle, params, progress=False)
    assert run.frames_in_bag == len(run.records) == len(plain.records) == 12 and run.truth_without_image == 0
    _same_frames(run, plain)


def _messages(bag: Path) -> list:
    from rosbags.rosbag2 import Reader

    with Reader(bag) as reader:
        return [(c.topic, c.msgtype, t, raw) for c, t, raw in reader.messages()]


def test_an_unknown_truth_keypoint_leaves_the_others_measured_and_the_report_strict_json(small_replay,
                                                                                       exported_bundle, tmp_path):
    """One NaN truth keypoint (an occluded point) made every mean error it entered NaN, shown
    as "no data", and report.json held a bare NaN that strict JSON parsers refuse."""
    bag, plain, params = small_replay
    frame = sorted(t for _, kind, t, _ in _messages(bag) if kind.endswith("FrameTruth"))[3]

    def occluded(store, messages):
        out = []
        for topic, kind, t, raw in messages:
            if kind.endswith("FrameTruth") and t == frame:
                msg = store.deserialize_cdr(raw, kind)
                msg.keypoints[0].x = float("nan")
                raw = store.serialize_cdr(msg, kind)
            out.append((topic, kind, t, raw))
        return out

    variant = tmp_path / "variant"
    _rewrite(bag, variant, occluded)
    run = replay_offline(variant, exported_bundle, params, progress=False)
    errors = [r.error_px for r in run.records]
    assert all(e is not None and np.isfinite(e) for e in errors)
    assert errors[:3] + errors[4:] == [r.error_px for r in plain.records][:3] + [r.error_px for r in
                                                                                 plain.records][4:]
    out = tmp_path / "report"
    write_report(out, build_report(run, variant, run.bundle, params, "offline"), run, plots=False)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    doc = json.loads((out / "report.json").read_text(), parse_constant=refuse)
    assert np.isfinite(doc["overall"]["mean_error_px"])
