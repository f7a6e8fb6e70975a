"""Offline replay: every image of a bag through the node's own per-frame code
(:class:`usn_offline.runtime.stream.FrameStream`, set up from the node's parameters file),
judged against the bag's ground truth when it has one."""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from usn_offline.errors import ReplayError
from usn_offline.jsonio import finite_only
from usn_offline.perturb import PhotometricBox
from usn_offline.replay.bag_reader import BagImage, BagReader, BagTruth
from usn_offline.replay.records import FrameRecord, add_truth, frame_record
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.pipeline import KeypointPipeline
from usn_offline.runtime.stream import FrameStream, StreamSettings


@dataclass
class ReplayRun:
    """What one pass over a bag produced."""

    records: list[FrameRecord]
    image_topic: str
    has_truth: bool
    bundle: Bundle | None = None  # the bundle the frames were served with
    complete: bool = True
    problem: str | None = None  # why the bag ended early, when it did
    frames_in_bag: int = 0
    truth_without_image: int = 0
    seconds: float = 0.0
    covered: PhotometricBox | None = None  # the lighting range the per-frame decisions cover
    extra: dict = field(default_factory=dict)  # more report sections (the live replay's)
    live_latencies_ms: list[float] = field(default_factory=list)


class NominalKeypoints:
    """The detector's keypoints on a frame's nominal image (the same pipeline, no monitor
    state involved), cached for consecutive frames of a static view."""

    def __init__(self, pipeline: KeypointPipeline) -> None:
        self.pipeline = pipeline
        self._key: bytes | None = None
        self._value: np.ndarray | None = None

    def __call__(self, truth: BagTruth) -> np.ndarray | None:
        key = hashlib.sha1(truth.nominal_data).digest()
        if key != self._key:
            stream = FrameStream(self.pipeline)
            self._key, self._value = key, stream.process_compressed(truth.nominal_format, truth.nominal_data
                                                                    ).keypoints_px
        return self._value


def process_image(stream: FrameStream, image: BagImage):
    if image.compressed:
        return stream.process_compressed(image.format, image.data)
    return stream.process_raw(image.height, image.width, image.encoding, image.is_bigendian, image.step, image.data)


def _verifier(bundle: Bundle, settings: StreamSettings):
    """The node's per-frame prover, or None without torch (every frame NOT_CHECKED then)."""
    try:
        from usn_offline.certify.frame import make_verifier
    except ImportError:
        return None
    return make_verifier(bundle, settings.frame_proof, settings.frame_proof_max_boxes, settings.frame_proof_lighting)


def _take(waiting: dict, stamp_ns: int):
    """The first of what waits under ``stamp_ns`` (removing the stamp once none is left)."""
    queue = waiting[stamp_ns]
    item = queue.popleft()
    if not queue:
        del waiting[stamp_ns]
    return item


def replay_offline(bag: Path | str, bundle_dir: Path | str, params_file: Path | str, image_topic: str | None = None,
                   frames_out: Path | None = None, progress: bool = True) -> ReplayRun:
    """Replay ``bag`` through the runtime the node runs, with the node's ``params_file``.

    Per-frame records are also streamed to ``frames_out`` (JSON lines) as they are made,
    so a long bag's results survive an interruption. A bag that ends early or turns
    unreadable ends the run with ``complete`` False and what was read so far.
    """
    bundle = Bundle.load(bundle_dir)
    settings = StreamSettings.from_params_file(params_file)
    stream = settings.open(bundle, verifier=_verifier(bundle, settings))
    bundle = stream.pipeline.bundle  # as served: the backend's own gap in delta + gap, as on the robot
    nominal = NominalKeypoints(KeypointPipeline(bundle, stream.pipeline.backend, stream.pipeline.monitor,
                                                max_pixels=settings.max_image_pixels))
    started = time.perf_counter()
    with BagReader(bag, image_topic) as reader:
        covered = bundle.lighting_range(settings.frame_proof_lighting)
        run = ReplayRun([], reader.image_topic, reader.has_truth, bundle, frames_in_bag=reader.image_count,
                        covered=covered)
        if reader.truncated:
            run.complete, run.problem = False, reader.problem
        # Waiting for their ground truth / their image, by header stamp; several frames may
        # share a stamp (a driver that does not advance it), paired in the order logged.
        images: dict[int, deque[FrameRecord]] = defaultdict(deque)
        truths: dict[int, deque[BagTruth]] = defaultdict(deque)
        count = 0  # images read so far: each record's index is its place in the bag
        sink = frames_out.open("w") if frames_out else None
        bar = tqdm(total=reader.image_count, desc="replay", unit="frame", disable=not progress)

        def finish(record: FrameRecord, truth: BagTruth | None) -> None:
            if truth is not None:
                add_truth(record, truth, nominal(truth) if not truth.malformed else None, bundle, covered)
            run.records.append(record)
            if sink:
                sink.write(json.dumps(finite_only(record.to_dict()), allow_nan=False) + "\n")

        try:
            for message in reader.messages():
                if isinstance(message, BagTruth):
                    if images.get(message.stamp_ns):
                        finish(_take(images, message.stamp_ns), message)
                    else:
                        truths[message.stamp_ns].append(message)
                    continue
                result = process_image(stream, message)
                record = frame_record(count, message.stamp_ns, result, result.seconds["total"])
                count += 1
                bar.update()
                if truths.get(message.stamp_ns):
                    finish(record, _take(truths, message.stamp_ns))
                elif reader.has_truth:
                    images[message.stamp_ns].append(record)
                else:
                    finish(record, None)
        except ReplayError as exc:
            run.complete, run.problem = False, str(exc)
        finally:
            # Images whose truth never came: judged without it, in bag order.
            for record in sorted((r for queue in images.values() for r in queue), key=lambda r: r.index):
                finish(record, None)
            run.truth_without_image = sum(len(queue) for queue in truths.values())
            bar.close()
            if sink:
                sink.close()
    run.records.sort(key=lambda r: r.index)
    run.seconds = time.perf_counter() - started
    return run
