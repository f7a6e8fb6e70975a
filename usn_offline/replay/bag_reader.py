"""Read camera frames (and our ground truth, when the bag has it) from any rosbag2 bag,
MCAP or sqlite3, recorded by a user or written by ``make-bag`` (``rosbags.AnyReader``)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mcap.exceptions import EndOfFile, McapError
from mcap.records import Channel, Message, Schema
from mcap.stream_reader import StreamReader
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import Reader as Reader2

from usn_offline.errors import ReplayError
from usn_offline.replay.typestore import COMPRESSED_IMAGE, FRAME_TRUTH, IMAGE, replay_typestore

IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)


@dataclass(frozen=True)
class BagImage:
    """One image message: the fields the node receives."""

    stamp_ns: int  # header stamp
    frame_id: str
    compressed: bool
    data: bytes
    height: int = 0
    width: int = 0
    encoding: str = ""
    is_bigendian: bool = False
    step: int = 0
    format: str = ""  # CompressedImage only


@dataclass(frozen=True)
class BagTruth:
    """One ``usn_keypoint_msgs/FrameTruth``."""

    stamp_ns: int
    scenario: str
    frame_index: int
    contrast: float
    brightness: float
    malformed: bool
    keypoints: np.ndarray  # (K, 2) pixels of the frame
    nominal_format: str
    nominal_data: bytes


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 10**9 + int(header.stamp.nanosec)


class BagReader:
    """Open a bag, pick its image topic, and stream images and ground truth in log order.

    ``image_topic`` None: the bag's only image topic (Image or CompressedImage); an error
    lists the candidates when there are several or the named one is missing.

    An MCAP bag that ends early (a recording killed before rosbag2 wrote the file's
    summary) or has no metadata.yaml cannot be opened by ``rosbags``; it is read front to
    back with the ``mcap`` library instead, up to where it ends (``truncated`` tells,
    ``problem`` says where).
    """

    def __init__(self, path: Path | str, image_topic: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ReplayError(f"bag not found: {self.path}")
        folder = self.path.parent if self.path.is_file() and self.path.suffix in (".mcap", ".db3") else self.path
        self.store = replay_typestore()
        # A rosbag2 bag is a folder (whatever its name: AnyReader would take a folder named
        # *.bag for ROS 1); a *.bag file is a ROS 1 bag, which AnyReader reads.
        ros1 = folder.is_file() and folder.suffix == ".bag"
        self._reader: AnyReader | Reader2 | None = None
        self._mcap: Path | None = None
        self.truncated = False
        self.problem: str | None = None
        try:
            # Inside the try: a folder without metadata.yaml (rosbag2 writes it when a
            # recording closes, so a killed one has none) is read from its MCAP file below.
            self._reader = (AnyReader([folder], default_typestore=self.store) if ros1
                            else Reader2(folder) if folder.is_dir() else None)
            if self._reader is None:
                raise ReplayError("not a rosbag2 folder, an .mcap/.db3 file or a ROS 1 .bag file")
            self._reader.open()
            counts = {c.topic: (c.msgtype, c.msgcount) for c in self._reader.connections}
        except Exception as exc:  # rosbags raises its own error types for unreadable bags
            self._reader = None
            self._mcap = _single_mcap(folder)
            counts, problem = _scan_mcap(self._mcap) if self._mcap else ({}, None)
            if not counts:  # no MCAP, or nothing in it: the original error stands
                raise ReplayError(f"{self.path}: cannot open as a rosbag2 bag ({type(exc).__name__}: {exc})"
                                  + (f"; no message could be recovered ({problem})" if problem else "")) from exc
            self.truncated, self.problem = problem is not None, problem
        self.topics = {topic: kind for topic, (kind, _) in counts.items()}
        images = sorted(t for t, kind in self.topics.items() if kind in IMAGE_TYPES)
        listing = ", ".join(f"{t} ({k})" for t, k in sorted(self.topics.items())) or "none"
        if image_topic is None:
            if len(images) != 1:
                self.close()
                what = "no image topic" if not images else f"{len(images)} image topics"
                raise ReplayError(f"{self.path}: {what}; choose one with --image-topic (topics: {listing})")
            image_topic = images[0]
        elif image_topic not in self.topics:
            self.close()
            raise ReplayError(f"{self.path}: no topic '{image_topic}' (topics: {listing})")
        elif self.topics[image_topic] not in IMAGE_TYPES:
            self.close()
            raise ReplayError(f"{self.path}: topic '{image_topic}' is {self.topics[image_topic]}, not an image "
                              f"(image topics: {', '.join(images) or 'none'})")
        self.image_topic = image_topic
        truths = sorted(t for t, kind in self.topics.items() if kind == FRAME_TRUTH)
        self.truth_topic = truths[0] if truths else None
        self.image_count = counts[image_topic][1]

    @property
    def has_truth(self) -> bool:
        return self.truth_topic is not None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> BagReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def messages(self) -> Iterator[BagImage | BagTruth]:
        """Images of the chosen topic and ground truth, in log-time order. A message that
        cannot be read (a corrupt bag) raises :class:`ReplayError` at that point; a
        truncated MCAP bag just ends where its data ends."""
        wanted = {self.image_topic: self.topics[self.image_topic]}
        if self.truth_topic:
            wanted[self.truth_topic] = FRAME_TRUTH
        # AnyReader (ROS 1) deserialises with the bag's own definitions; rosbag2 data is CDR.
        deserialize = self._reader.deserialize if isinstance(self._reader, AnyReader) else self.store.deserialize_cdr
        images = 0
        try:
            for topic, kind, raw in self._raw_messages(wanted):
                msg = deserialize(raw, kind)
                if topic == self.image_topic:
                    images += 1
                    yield _image(msg, kind == COMPRESSED_IMAGE)
                else:
                    yield _truth(msg)
        except ReplayError:
            raise
        except Exception as exc:
            raise ReplayError(f"{self.path}: unreadable after {images} image(s) "
                              f"({type(exc).__name__}: {exc})") from exc

    def _raw_messages(self, wanted: dict[str, str]) -> Iterator[tuple[str, str, bytes]]:
        if self._reader is not None:
            connections = [c for c in self._reader.connections if c.topic in wanted]
            for conn, _, raw in self._reader.messages(connections=connections):
                yield conn.topic, conn.msgtype, raw
            return
        channels: dict[int, str] = {}
        for record in _mcap_records(self._mcap):
            if isinstance(record, Channel):
                channels[record.id] = record.topic
            elif isinstance(record, Message) and channels.get(record.channel_id) in wanted:
                topic = channels[record.channel_id]
                yield topic, wanted[topic], record.data


def _single_mcap(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.mcap")) if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def _mcap_records(path: Path) -> Iterator:
    """Records of an MCAP file front to back, ending quietly where the file ends early."""
    with path.open("rb") as stream:
        try:
            yield from StreamReader(stream, skip_magic=False).records
        except (EndOfFile, struct.error, McapError):
            return


def _scan_mcap(path: Path) -> tuple[dict[str, tuple[str, int]], str | None]:
    """{topic: (message type, messages)} of an MCAP file read front to back, and why it ends
    early (None when it reads to its proper end)."""
    schemas: dict[int, str] = {}
    channels: dict[int, tuple[str, int]] = {}
    counts: dict[int, int] = {}
    problem = None
    with path.open("rb") as stream:
        try:
            for record in StreamReader(stream, skip_magic=False).records:
                if isinstance(record, Schema):
                    schemas[record.id] = record.name
                elif isinstance(record, Channel):
                    channels[record.id] = (record.topic, record.schema_id)
                elif isinstance(record, Message):
                    counts[record.channel_id] = counts.get(record.channel_id, 0) + 1
        except (EndOfFile, struct.error, McapError) as exc:
            problem = ("the file ends early (no summary: the recording was cut off)"
                       + (f" ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"))
        except Exception as exc:  # zstd/lz4 errors of a chunk cut in the middle
            problem = f"unreadable data ({type(exc).__name__}: {exc})"
    return ({topic: (schemas.get(schema, ""), counts.get(cid, 0)) for cid, (topic, schema) in channels.items()},
            problem)


def _image(msg, compressed: bool) -> BagImage:
    data = bytes(np.asarray(msg.data, dtype=np.uint8))
    if compressed:
        return BagImage(stamp_ns(msg.header), msg.header.frame_id, True, data, format=msg.format)
    return BagImage(stamp_ns(msg.header), msg.header.frame_id, False, data, height=int(msg.height),
                    width=int(msg.width), encoding=msg.encoding, is_bigendian=bool(msg.is_bigendian),
                    step=int(msg.step))


def _truth(msg) -> BagTruth:
    keypoints = np.array([[k.x, k.y] for k in msg.keypoints], dtype=np.float64).reshape(-1, 2)
    return BagTruth(stamp_ns(msg.header), msg.scenario, int(msg.frame_index), float(msg.contrast),
                    float(msg.brightness), bool(msg.malformed), keypoints, msg.nominal_format,
                    bytes(np.asarray(msg.nominal_data, dtype=np.uint8)))
