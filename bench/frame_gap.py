"""The per-frame proofs' gap: for the frames a replay left uncertified although their true
lighting lies in the range, how far an attack on the frame's own set moves a keypoint.

A frame's set (``certify.frame.FramePixelSets``) holds every nominal image the frame can
come from under the range: at a point (a, b) of the inverse range, each network pixel is
free in an interval (its share of clipped frame pixels hides any value their side of the
clip). Projected gradient ascent over those values, at a grid of points (a, b) where the
frame can arise, maximises the largest keypoint deviation from the served keypoints (the
proof's property; ``FrameCertifier.attack``). Above delta: the frame is breakable by a
member of the set, so no sound proof exists for it (up to the network pixels' shares of
the same frame pixel, which the attack treats as independent). Far below delta: the
proof, not the network, leaves it open.

    python bench/frame_gap.py --bag runs/demo/scenario_bag --bundle runs/demo/bundle \\
        --report runs/demo/replay/frames.jsonl [--prove]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from usn_offline.certify.frame import FrameCertifier
from usn_offline.replay.bag_reader import BagImage, BagReader
from usn_offline.runtime.backends import OnnxRuntimeBackend
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.image_decode import decode_compressed, decode_image
from usn_offline.runtime.preprocess import preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bag", required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--report", required=True, help="frames.jsonl of a replay of that bag and bundle")
    parser.add_argument("--prove", action="store_true", help="also rerun each frame's proof (its bound)")
    parser.add_argument("--max-boxes", type=int, default=16)
    args = parser.parse_args()
    with open(args.report) as lines:
        rows = [json.loads(line) for line in lines]
    open_rows = {r["index"]: r for r in rows if r.get("in_region") and not r["certified"] and not r.get("malformed")}
    bundle = Bundle.load(args.bundle)
    backend = OnnxRuntimeBackend(bundle.onnx_path)  # the node's CPU backend, as it serves
    certifier = FrameCertifier.for_bundle(bundle, args.max_boxes)
    frames: dict[int, np.ndarray] = {}
    with BagReader(args.bag) as reader:
        index = 0
        for message in reader.messages():
            if isinstance(message, BagImage):
                if index in open_rows:
                    frames[index] = (decode_compressed(message.format, message.data) if message.compressed else
                                     decode_image(message.height, message.width, message.encoding,
                                                  message.is_bigendian, message.step, message.data, 1 << 30))
                index += 1
    print(f"{len(rows)} frames, {sum(bool(r.get('in_region')) and not r.get('malformed') for r in rows)} in range, "
          f"{len(open_rows)} of them uncertified; delta {bundle.delta_px} px (network input)")
    by_scenario: dict[str, list[tuple[float, float]]] = defaultdict(list)
    seen: dict[bytes, tuple[float, float]] = {}
    for index in tqdm(sorted(frames), desc="frames", unit="frame"):
        frame = frames[index]
        served = backend.infer(preprocess(frame, bundle.preprocess)[None, None])[0]
        key = frame.tobytes()
        if key not in seen:  # a still camera sends the same frame many times
            bound = certifier.prove(frame, served).deviation_px if args.prove else float("nan")
            seen[key] = (certifier.attack(frame, served), bound)
        attacked, bound = seen[key]
        by_scenario[open_rows[index]["scenario"]].append((attacked, bound))
        tqdm.write(f"frame {index:4d} {open_rows[index]['scenario']:>18}: attack {attacked:7.3f} px"
                   + (f", proof bound {bound:.3g} px" if args.prove else ""))
    print(f"{'scenario':>18} | frames | attack > delta | attack median | attack max | proof bound median (min-max)")
    rows_of = list(by_scenario.items()) + [("all", [v for values in by_scenario.values() for v in values])]
    for scenario, values in rows_of:
        if not values:
            continue
        attacks, bounds = np.array(values).T
        print(f"{scenario:>18} | {len(attacks):6d} | {int((attacks > bundle.delta_px).sum()):14d} | "
              f"{np.median(attacks):10.3f} px | {attacks.max():7.3f} px | "
              + (f"{np.median(bounds):.3g} px ({bounds.min():.3g}-{bounds.max():.3g})" if args.prove else "-"))


if __name__ == "__main__":
    main()
