"""Scenario bags through the rosbags library: written frames and ground truth read back
exactly (MCAP and sqlite3), topic selection, and bags that end early or are corrupt."""

import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from usn_offline.data import load_split
from usn_offline.data.backgrounds import load_backgrounds
from usn_offline.errors import ConfigError, ReplayError
from usn_offline.replay.bag_reader import BagImage, BagReader, BagTruth
from usn_offline.replay.bag_writer import BagConfig, make_bag
from usn_offline.replay.scenarios import Scenario
from usn_offline.replay.views import relight
from usn_offline.runtime.image_decode import decode_compressed, decode_image


@pytest.fixture(scope="module")
def targets(tiny_dataset):
    return load_split(tiny_dataset, "test")


def _write(tmp_path, targets, **overrides):
    config = BagConfig(**{"scenarios": ("static", "moving+dusk", "static+malformed"), "frames_per_scenario": 12,
                          **overrides})
    out = tmp_path / f"bag_{config.storage}"
    summary = make_bag(out, targets.images, targets.keypoints, load_backgrounds(), config, progress=False)
    return out, summary, config


def _read_all(path, topic=None):
    with BagReader(path, topic) as reader:
        messages = list(reader.messages())
        return reader, messages


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_round_trip(tmp_path, targets, storage):
    out, summary, config = _write(tmp_path, targets, storage=storage, compressed="png")
    assert summary.frames == 36 and summary.malformed == 1  # static+malformed: every 10th frame from the 6th
    assert (out / "metadata.yaml").is_file()
    reader, messages = _read_all(out, "/camera/image_raw")
    images = [m for m in messages if isinstance(m, BagImage)]
    truths = {m.stamp_ns: m for m in messages if isinstance(m, BagTruth)}
    assert reader.image_count == len(images) == len(truths) == 36 and reader.truth_topic == "/ground_truth"
    assert set(reader.topics) == {"/camera/image_raw", "/camera/image_raw/compressed", "/ground_truth", "/clock"}
    stamps = [m.stamp_ns for m in images]
    assert stamps == sorted(stamps) and len(set(stamps)) == 36
    assert np.allclose(np.diff(stamps), 1e9 / config.fps, atol=1)
    for i, image in enumerate(images):
        truth = truths[image.stamp_ns]
        scenario = Scenario.parse(truth.scenario)
        recipe = scenario.frame(i % 12, 12)
        assert truth.frame_index == i and truth.scenario == config.scenarios[i // 12]
        assert (truth.contrast, truth.brightness) == (recipe.contrast, recipe.brightness)
        assert truth.malformed == (recipe.malformed is not None)
        assert image.frame_id == "camera_optical_frame" and truth.keypoints.shape == (4, 2)
        nominal = decode_compressed(truth.nominal_format, truth.nominal_data)
        assert nominal.shape == (480, 640)
        if truth.malformed:
            with pytest.raises(ValueError):
                decode_image(image.height, image.width, image.encoding, image.is_bigendian, image.step, image.data)
            continue
        frame = decode_image(image.height, image.width, image.encoding, image.is_bigendian, image.step, image.data)
        assert frame.shape == (480, 640, 3) and image.encoding == "rgb8"
        # The frame is exactly its nominal frame relit by the true (a, b).
        np.testing.assert_array_equal(frame, relight(np.repeat(nominal[:, :, None], 3, 2), truth.contrast,
                                                     truth.brightness))
        # Keypoints land inside the frame.
        assert (truth.keypoints >= -0.5).all() and (truth.keypoints[:, 0] <= 639.5).all()
    # The compressed topic holds the same frames (PNG is lossless).
    _, compressed = _read_all(out, "/camera/image_raw/compressed")
    first = next(m for m in compressed if isinstance(m, BagImage))
    assert first.compressed and first.format == "png"
    raw = images[0]
    np.testing.assert_array_equal(decode_compressed(first.format, first.data),
                                  decode_image(raw.height, raw.width, raw.encoding, raw.is_bigendian, raw.step,
                                               raw.data))


def test_bags_are_reproducible_and_keypoints_follow_the_pixels(tmp_path, targets):
    config = BagConfig(scenarios=("moving",), frames_per_scenario=6, encoding="mono8")
    a = make_bag(tmp_path / "a", targets.images, targets.keypoints, load_backgrounds(), config, progress=False)
    b = make_bag(tmp_path / "b", targets.images, targets.keypoints, load_backgrounds(), config, progress=False)
    _, ma = _read_all(a.path)
    _, mb = _read_all(b.path)
    assert [m.data if isinstance(m, BagImage) else m.nominal_data for m in ma] == \
           [m.data if isinstance(m, BagImage) else m.nominal_data for m in mb]
    # The target's dark pad interior lies inside the keypoint polygon: its centroid is dark.
    for m in ma:
        if isinstance(m, BagTruth):
            nominal = decode_compressed(m.nominal_format, m.nominal_data)
            cx, cy = m.keypoints.mean(axis=0)
            mask = np.zeros(nominal.shape, np.uint8)
            cv2.fillConvexPoly(mask, np.round(m.keypoints).astype(np.int32), 1)
            inside, outside = nominal[mask == 1].mean(), nominal[mask == 0].mean()
            assert mask.sum() > 0.15 * mask.size  # the target fills much of the frame
            assert nominal[int(round(cy)), int(round(cx))] < 255 and inside != outside


def test_topic_selection_errors_list_the_topics(tmp_path, targets):
    out, _, _ = _write(tmp_path, targets, compressed="jpeg", scenarios=("static",), frames_per_scenario=2)
    with pytest.raises(ReplayError, match="2 image topics; choose one with --image-topic .*/camera/image_raw "):
        BagReader(out)
    with pytest.raises(ReplayError, match=r"no topic '/nope' \(topics: /camera/image_raw \(sensor_msgs/msg/Image\)"):
        BagReader(out, "/nope")
    with pytest.raises(ReplayError, match="'/ground_truth' is usn_keypoint_msgs/msg/FrameTruth, not an image"):
        BagReader(out, "/ground_truth")
    with pytest.raises(ReplayError, match="bag not found"):
        BagReader(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.yaml").write_text("not: a bag\n")
    with pytest.raises(ReplayError, match="cannot open as a rosbag2 bag"):
        BagReader(tmp_path / "junk")


def test_bag_config_errors(tmp_path, targets):
    with pytest.raises(ConfigError, match="unknown scenario recipe 'dawn'"):
        BagConfig(scenarios=("dawn",))
    with pytest.raises(ConfigError, match="more than one camera recipe"):
        BagConfig(scenarios=("static+moving",))
    with pytest.raises(ConfigError, match="encoding must be one of"):
        BagConfig(encoding="bayer_rggb8")
    out, _, _ = _write(tmp_path, targets, scenarios=("static",), frames_per_scenario=1)
    with pytest.raises(ReplayError, match="already exists"):
        make_bag(out, targets.images, targets.keypoints, load_backgrounds(), BagConfig(), progress=False)


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_make_bag_leaves_no_half_bag(tmp_path, targets, monkeypatch, failure):
    from usn_offline.replay import bag_writer

    rendered = []
    original = bag_writer.render_view

    def failing_on_the_third_frame(*args):
        rendered.append(1)
        if len(rendered) == 3:
            raise failure
        return original(*args)

    monkeypatch.setattr(bag_writer, "render_view", failing_on_the_third_frame)
    out = tmp_path / "bag"
    with pytest.raises(type(failure)):
        make_bag(out, targets.images, targets.keypoints, load_backgrounds(), BagConfig(frames_per_scenario=2),
                 progress=False)
    assert len(rendered) == 3 and not out.exists() and list(tmp_path.iterdir()) == []


def test_truncated_mcap_is_read_up_to_where_it_ends(tmp_path, targets):
    out, summary, _ = _write(tmp_path, targets, scenarios=("static", "dusk"), frames_per_scenario=20)
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    mcap = next(cut.glob("*.mcap"))
    os.truncate(mcap, mcap.stat().st_size // 2)
    reader, messages = _read_all(cut)
    images = [m for m in messages if isinstance(m, BagImage)]
    assert reader.truncated and "ends early" in reader.problem
    assert 0 < len(images) < summary.frames and reader.image_count == len(images)
    # What was recovered is what was written.
    _, full = _read_all(out)
    assert [m.data for m in images] == [m.data for m in full if isinstance(m, BagImage)][:len(images)]


@pytest.mark.parametrize("cut", [False, True])
def test_an_mcap_without_metadata_is_read_from_the_file(tmp_path, targets, cut):
    """A recording killed before rosbag2 closed it has no metadata.yaml (and maybe a cut
    MCAP): the folder, or the .mcap given alone, is still read, as far as it goes."""
    out, summary, _ = _write(tmp_path, targets, scenarios=("static", "dusk"), frames_per_scenario=5)
    bare = tmp_path / "bare"
    bare.mkdir()
    mcap = shutil.copy(next(out.glob("*.mcap")), bare)
    if cut:
        os.truncate(mcap, os.path.getsize(mcap) * 2 // 3)
    _, full = _read_all(out)
    for path in (bare, mcap):
        reader, messages = _read_all(path)
        images = [m for m in messages if isinstance(m, BagImage)]
        assert reader.truncated == cut and (0 < len(images) < summary.frames if cut else len(images) == summary.frames)
        assert reader.image_count == len(images) and reader.has_truth
        assert [m.data for m in images] == [m.data for m in full if isinstance(m, BagImage)][:len(images)]


def test_corrupt_bag_fails_with_a_one_line_error(tmp_path, targets):
    out, _, _ = _write(tmp_path, targets, scenarios=("static",), frames_per_scenario=3, storage="sqlite3")
    db = next(out.glob("*.db3"))
    os.truncate(db, db.stat().st_size // 3)
    with pytest.raises(ReplayError, match="cannot open as a rosbag2 bag"):
        BagReader(out)


def test_make_bag_cli(tmp_path, tiny_dataset):
    out = tmp_path / "cli_bag"
    proc = subprocess.run([sys.executable, "-m", "usn_offline.cli", "make-bag", "--data", str(tiny_dataset), "--out",
                           str(out), "--scenario", "tunnel", "lens_cap+moving", "--frames", "4", "--quiet",
                           "--storage", "sqlite3", "--width", "320", "--height", "240"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "8 frames (0 malformed on purpose) of tunnel (4), lens_cap+moving (4)" in proc.stdout
    reader, messages = _read_all(out)
    assert reader.image_count == 8 and next(m for m in messages if isinstance(m, BagImage)).width == 320
    bad = subprocess.run([sys.executable, "-m", "usn_offline.cli", "make-bag", "--data", str(tiny_dataset),
                          "--out", str(tmp_path / "x"), "--scenario", "noon"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown scenario recipe 'noon'" in bad.stderr


def test_a_rosbag2_folder_named_like_a_ros1_bag(tmp_path, targets):
    out = tmp_path / "scenarios.bag"  # a folder: rosbag2, whatever its name says
    make_bag(out, targets.images, targets.keypoints, load_backgrounds(),
             BagConfig(scenarios=("static",), frames_per_scenario=2), progress=False)
    reader, messages = _read_all(out)
    assert not reader.truncated and reader.image_count == 2 and len(messages) == 4
    mcap = next(out.glob("*.mcap"))
    reader, _ = _read_all(mcap)  # the .mcap file itself names the bag too
    assert reader.image_count == 2
