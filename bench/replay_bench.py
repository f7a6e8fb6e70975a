"""Replay throughput at 640x480 (frames/s): offline (bag reading, the node's per-frame code,
the nominal-image inference and the records) and live (lock-step through the node process
over DDS), each against the node's bare per-frame work on the same frames in this process.

    source scripts/env.sh && python bench/replay_bench.py --bundle runs/demo/bundle --data runs/demo/data
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from usn_offline.data import load_split
from usn_offline.data.backgrounds import load_backgrounds
from usn_offline.replay.bag_reader import BagImage, BagReader
from usn_offline.replay.bag_writer import BagConfig, make_bag
from usn_offline.replay.offline import process_image, replay_offline
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.stream import StreamSettings

PARAMS = Path(__file__).resolve().parents[1] / "launch" / "usn_keypoint_node.params.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--frames", type=int, default=200, help="frames in the bag (10 scenarios)")
    parser.add_argument("--no-live", action="store_true", help="skip the live replay (needs rclpy)")
    args = parser.parse_args()

    targets = load_split(args.data, "test")
    with tempfile.TemporaryDirectory() as tmp:
        bag = Path(tmp) / "bag"
        make_bag(bag, targets.images, targets.keypoints, load_backgrounds(),
                 BagConfig(frames_per_scenario=max(1, args.frames // 10)), progress=False)
        with BagReader(bag) as reader:
            images = [m for m in reader.messages() if isinstance(m, BagImage)]
        stream = StreamSettings.from_params_file(PARAMS).open(Bundle.load(args.bundle))
        for image in images[:5]:  # warm-up
            process_image(stream, image)
        start = time.perf_counter()
        for image in images:
            process_image(stream, image)
        baseline = len(images) / (time.perf_counter() - start)

        offline = replay_offline(bag, args.bundle, PARAMS, progress=False)
        rows = [("node per-frame work (baseline)", baseline),
                ("offline replay", len(offline.records) / offline.seconds)]
        if not args.no_live:
            from usn_offline.replay.live import LiveConfig, replay_live

            live = replay_live(bag, args.bundle, PARAMS, LiveConfig(record=False), Path(tmp), progress=False)
            answered = sum(f.statuses > 0 for f in live.frames)
            rows.append((f"live replay, lock-step ({answered}/{len(live.frames)} answered)",
                         len(live.frames) / live.seconds))
    print(f"{len(images)} frames, 640x480 rgb8, bundle {args.bundle}")
    print(f"{'':>44} | frames/s | vs baseline")
    for name, rate in rows:
        print(f"{name:>44} | {rate:8.1f} | {rate / baseline:10.2f}x")


if __name__ == "__main__":
    main()
