"""Per-frame proofs on a bundle: the fraction of camera-size frames proved and the cost of
a proof as a ratio to serving the frame (decode-free preprocessing + ONNX Runtime
inference, measured in this process).

Frames: the first N test images of the bundle's dataset, upscaled to 640x480 RGB
(8-bit), relit with a random (a0, b0) inside each lighting range (so the stated
assumption holds up to the 8-bit rounding), proved for that range.

    python bench/frame_proof_bench.py --bundle runs/demo/bundle --data runs/demo/data
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import onnxruntime as ort
from timing import median_seconds  # noqa: E402  (bench/timing.py, beside this script)

from usn_offline.certify.frame import FrameCertifier, FrameProofConfig
from usn_offline.data import load_split
from usn_offline.perturb import PhotometricBox
from usn_offline.resources import keep_freed_memory
from usn_offline.runtime.bundle import Bundle
from usn_offline.runtime.preprocess import preprocess

RANGES = {"+-1 %": 0.01, "+-3 %": 0.03, "+-5 %": 0.05, "+-10 %": 0.10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/demo/bundle")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--max-boxes", type=int, default=16)
    parser.add_argument("--rounding", action="store_true", help="also model the camera's rounding")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default of giving freed memory back (the CLI does not)")
    args = parser.parse_args()
    if not args.default_malloc:
        keep_freed_memory()  # as the usn-offline CLI and the node's proof process run
    bundle = Bundle.load(args.bundle)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    test = load_split(args.data, "test")
    rng = np.random.default_rng(0)

    def serve(frame: np.ndarray) -> np.ndarray:
        return session.run(None, {name: preprocess(frame, bundle.preprocess)[None, None].astype(np.float32)})[0][0]

    nominals = [cv2.cvtColor(cv2.resize((255 * test.images[i]).round().astype(np.uint8), (640, 480),
                                        interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB)
                for i in range(min(args.images, len(test)))]
    serve_s = median_seconds(lambda: serve(nominals[0]), 200)
    print(f"bundle {args.bundle}: delta {bundle.delta_px} px (network input), {len(nominals)} frames 640x480 rgb8, "
          f"budget {args.max_boxes} boxes, camera rounding {'on' if args.rounding else 'off'}")
    print(f"serving one frame (preprocess + ONNX Runtime): {serve_s * 1e3:.2f} ms")
    print(f"{'lighting':>8} | {'certified':>9} | {'falsified':>9} | {'median proof':>12} | {'p90 proof':>9} | "
          "proof / serving")
    for label, eps in RANGES.items():
        lighting = PhotometricBox(1 - eps, 1 + eps, -eps, eps)
        certifier = FrameCertifier.from_onnx(bundle.onnx_path, bundle.preprocess, FrameProofConfig(
            lighting, bundle.delta_px, max_boxes=args.max_boxes, camera_rounding=args.rounding))
        times, certified, falsified = [], 0, 0
        for nominal in nominals:
            a0, b0 = rng.uniform(lighting.a_lo, lighting.a_hi), rng.uniform(lighting.b_lo, lighting.b_hi)
            frame = np.clip(np.rint(a0 * nominal.astype(np.float64) + 255 * b0), 0, 255).astype(np.uint8)
            served = serve(frame)
            t0 = time.perf_counter()
            proof = certifier.prove(frame, served)
            times.append(time.perf_counter() - t0)
            certified += proof.certified
            falsified += proof.status.value == "falsified"
        med, p90 = np.median(times), np.percentile(times, 90)
        print(f"{label:>8} | {100 * certified / len(nominals):8.0f} % | {falsified:9d} | {med * 1e3:9.0f} ms | "
              f"{p90 * 1e3:6.0f} ms | {med / serve_s:.0f}x")


if __name__ == "__main__":
    main()
