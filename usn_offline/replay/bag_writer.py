"""Write scenario bags: camera-size frames of a dataset's images under named lighting and
camera recipes, with each frame's ground truth, as a rosbag2 (MCAP or sqlite3) through
the ``rosbags`` library.

Topics (``/camera/image_raw`` renamable):

- ``/camera/image_raw``: ``sensor_msgs/Image`` (rgb8 by default), every frame;
- ``/camera/image_raw/compressed``: ``sensor_msgs/CompressedImage`` of the same frames,
  when asked for (PNG or JPEG);
- ``/ground_truth``: ``usn_keypoint_msgs/FrameTruth``, stamped like the image: the
  scenario, the true (contrast, brightness), the true keypoints and the nominal frame;
- ``/clock``: ``rosgraph_msgs/Clock`` at each frame (for ``use_sim_time`` replays).
"""

from __future__ import annotations

import shutil
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import Writer
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin
from tqdm import tqdm

from usn_offline.errors import ConfigError, ReplayError
from usn_offline.replay.scenarios import DEFAULT_SCENARIOS, FrameRecipe, Scenario
from usn_offline.replay.typestore import CLOCK, COMPRESSED_IMAGE, FRAME_TRUTH, IMAGE, replay_typestore
from usn_offline.replay.views import ViewLayout, relight, render_view

ENCODINGS = ("rgb8", "bgr8", "mono8")
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
COMPRESSED_FORMATS = ("png", "jpeg")
START_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z: bags are reproducible byte for byte in content


@dataclass(frozen=True)
class BagConfig:
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    frames_per_scenario: int = 40
    width: int = 640
    height: int = 480
    encoding: str = "rgb8"
    compressed: str | None = None  # also write <image_topic>/compressed in this format
    storage: str = "mcap"
    fps: float = 30.0
    seed: int = 0
    image_topic: str = "/camera/image_raw"
    frame_id: str = "camera_optical_frame"

    def __post_init__(self) -> None:
        for name in self.scenarios:
            Scenario.parse(name)
        if not self.scenarios:
            raise ConfigError("a bag needs at least one scenario")
        if self.frames_per_scenario < 1:
            raise ConfigError(f"frames per scenario must be >= 1, got {self.frames_per_scenario}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"encoding must be one of {', '.join(ENCODINGS)}, got '{self.encoding}'")
        if self.compressed not in (None, *COMPRESSED_FORMATS):
            raise ConfigError(f"compressed format must be one of {', '.join(COMPRESSED_FORMATS)}")
        if self.storage not in STORAGES:
            raise ConfigError(f"storage must be one of {', '.join(STORAGES)}, got '{self.storage}'")
        if not self.fps > 0:
            raise ConfigError(f"fps must be > 0, got {self.fps}")
        if not self.image_topic.startswith("/"):
            raise ConfigError(f"image topic must be absolute (start with '/'), got '{self.image_topic}'")


@dataclass
class BagSummary:
    path: Path
    frames: int
    frames_per_scenario: dict[str, int]
    malformed: int
    topics: dict[str, str]
    bytes: int = 0


def _segment_rng(seed: int, segment: int, name: str) -> np.random.Generator:
    # Stable across runs and Python versions (no hash()).
    return np.random.default_rng([seed, segment, zlib.crc32(name.encode())])


def _to_encoding(gray: np.ndarray, encoding: str) -> np.ndarray:
    return gray if encoding == "mono8" else np.repeat(gray[:, :, None], 3, axis=2)


def _image_fields(frame: np.ndarray, encoding: str, malformed: str | None) -> dict:
    """The fields of a sensor_msgs/Image carrying ``frame`` (mono or gray replicated), made
    malformed on purpose when asked."""
    height, width = frame.shape[:2]
    step = frame.strides[0]
    data = np.frombuffer(frame.tobytes(), np.uint8)
    if malformed == "unsupported_encoding":
        encoding = "bayer_rggb8"
    elif malformed == "truncated_data":
        data = data[: len(data) // 2]
    elif malformed == "empty_image":
        height = width = step = 0
        data = np.zeros(0, np.uint8)
    elif malformed == "step_too_small":
        step = width
        data = data[: step * height]
    elif malformed is not None:
        raise ConfigError(f"unknown malformed kind '{malformed}'")
    return {"height": height, "width": width, "encoding": encoding, "is_bigendian": 0, "step": step, "data": data}


def _png(image: np.ndarray) -> np.ndarray:
    bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ReplayError("cannot encode a PNG frame")
    return buf.reshape(-1)


def _compressed(image: np.ndarray, fmt: str, malformed: str | None) -> np.ndarray:
    if malformed is not None:
        return np.frombuffer(b"\x89PNG\r\n this is not an image", np.uint8)
    if fmt == "png":
        return _png(image)
    bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ReplayError("cannot encode a JPEG frame")
    return buf.reshape(-1)


def make_bag(out: Path | str, targets: np.ndarray, target_keypoints: np.ndarray,
             backgrounds: tuple[np.ndarray, ...], config: BagConfig = BagConfig(), progress: bool = True
             ) -> BagSummary:
    """Write a scenario bag to the (new) folder ``out``.

    ``targets``: (N, h, w) grayscale images in [0, 1] (e.g. a dataset's test split) with
    ``target_keypoints`` (N, K, 2) in their pixels; ``backgrounds``: grayscale photos.
    """
    out = Path(out)
    if out.exists():
        raise ReplayError(f"{out} already exists: remove it or choose another --out (a bag is a new folder)")
    if len(targets) == 0 or len(backgrounds) == 0:
        raise ConfigError("a bag needs at least one target image and one background photo")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _write_bag(out, targets, target_keypoints, backgrounds, config, progress)
    except BaseException:  # an interrupted or failed write leaves no half bag behind
        shutil.rmtree(out, ignore_errors=True)
        raise


def _write_bag(out: Path, targets: np.ndarray, target_keypoints: np.ndarray,
               backgrounds: tuple[np.ndarray, ...], config: BagConfig, progress: bool) -> BagSummary:
    store = replay_typestore()
    Image, Compressed = store.types[IMAGE], store.types[COMPRESSED_IMAGE]
    Truth, Keypoint = store.types[FRAME_TRUTH], store.types["usn_keypoint_msgs/msg/Keypoint2D"]
    Header, Time, Clock = (store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"],
                           store.types[CLOCK])
    topics = {config.image_topic: IMAGE, "/ground_truth": FRAME_TRUTH, "/clock": CLOCK}
    if config.compressed:
        topics[f"{config.image_topic}/compressed"] = COMPRESSED_IMAGE

    scenarios = [Scenario.parse(name) for name in config.scenarios]
    total = len(scenarios) * config.frames_per_scenario
    counts: Counter[str] = Counter()
    malformed = 0
    writer = Writer(out, version=9, storage_plugin=STORAGES[config.storage])
    if config.storage == "mcap":
        writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    with writer:
        conns = {topic: writer.add_connection(topic, kind, typestore=store) for topic, kind in topics.items()}
        bar = tqdm(total=total, desc="make-bag", unit="frame", disable=not progress)
        index = 0
        for segment, scenario in enumerate(scenarios):
            rng = _segment_rng(config.seed, segment, scenario.name)
            layouts = [ViewLayout.sample(rng, len(targets), len(backgrounds), scenario.moving)
                       for _ in range(scenario.views(config.frames_per_scenario))]
            for position in range(config.frames_per_scenario):
                recipe: FrameRecipe = scenario.frame(position, config.frames_per_scenario)
                layout = layouts[recipe.view]
                nominal, keypoints = render_view(layout, recipe.motion, targets[layout.image_index],
                                                 target_keypoints[layout.image_index],
                                                 backgrounds[layout.background_index], config.width, config.height)
                gray_nominal = np.clip(np.rint(255.0 * nominal), 0, 255).astype(np.uint8)
                nominal8 = _to_encoding(gray_nominal, config.encoding)
                frame = relight(nominal8, recipe.contrast, recipe.brightness)
                stamp_ns = START_NS + round(index * 1e9 / config.fps)
                header = Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9),
                                frame_id=config.frame_id)
                writer.write(conns["/clock"], stamp_ns, store.serialize_cdr(Clock(clock=header.stamp), CLOCK))
                truth = Truth(header=header, scenario=scenario.name, frame_index=index, contrast=recipe.contrast,
                              brightness=recipe.brightness, malformed=recipe.malformed is not None,
                              keypoints=[Keypoint(id=k, x=float(x), y=float(y), score=float("nan"))
                                         for k, (x, y) in enumerate(keypoints)],
                              nominal_format="png", nominal_data=_png(gray_nominal))
                writer.write(conns["/ground_truth"], stamp_ns, store.serialize_cdr(truth, FRAME_TRUTH))
                writer.write(conns[config.image_topic], stamp_ns, store.serialize_cdr(
                    Image(header=header, **_image_fields(frame, config.encoding, recipe.malformed)), IMAGE))
                if config.compressed:
                    fmt = "jpeg" if config.compressed == "jpeg" else "png"
                    writer.write(conns[f"{config.image_topic}/compressed"], stamp_ns, store.serialize_cdr(
                        Compressed(header=header, format=fmt,
                                   data=_compressed(_wire_order(frame, config.encoding), fmt, recipe.malformed)),
                        COMPRESSED_IMAGE))
                counts[scenario.name] += 1
                malformed += recipe.malformed is not None
                index += 1
                bar.update()
        bar.close()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BagSummary(out, index, dict(counts), malformed, topics, size)


def _wire_order(image: np.ndarray, encoding: str) -> np.ndarray:
    """Frames are gray, so RGB and BGR hold the same bytes; kept explicit for clarity."""
    return image[:, :, ::-1] if encoding == "bgr8" else image
