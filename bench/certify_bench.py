"""Certification benchmark: cost per image of IBP / CROWN / alpha-CROWN in forward-pass
equivalents, certified fraction at a few eps, and the radius-search time.

All timings come from this one process on this machine, and costs are reported as ratios
to a forward pass of the same model on the same device measured in the same run.

    python bench/certify_bench.py --checkpoint runs/demo/final.pt --data runs/demo/data   # the deployed demo network
    python bench/certify_bench.py --only-lirpa   # the single-box comparison with auto_LiRPA only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timing import median_seconds  # noqa: E402  (bench/timing.py, beside this script)

from usn_offline.certify import (
    BabConfig,
    Boxes,
    KeypointProperty,
    PixelMap,
    RadiusConfig,
    Status,
    certify_boxes,
    largest_certified_radius,
    lower,
    output_bounds,
)
from usn_offline.data import load_split
from usn_offline.perturb import PhotometricBox
from usn_offline.resources import keep_freed_memory
from usn_offline.train import load_checkpoint
from usn_offline.train.device import resolve_device, use_all_cpu_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/final.pt")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--delta", type=float, default=2.0)
    parser.add_argument("--bab-boxes", type=int, default=64)
    parser.add_argument("--radius-images", type=int, default=4, help="images for the (slow) radius search")
    parser.add_argument("--radius-boxes", type=int, nargs="+", default=[128, 256],
                        help="frontier radius search: boxes per image (one row each)")
    parser.add_argument("--lirpa-eps", type=float, nargs="*", default=[0.01, 0.03, 0.05, 0.1],
                        help="eps of the single-box comparison with auto_LiRPA CROWN (none: skip it)")
    parser.add_argument("--lirpa-images", type=int, default=4)
    parser.add_argument("--only-lirpa", action="store_true", help="stop after the auto_LiRPA comparison")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default of giving freed memory back (the CLI does not)")
    args = parser.parse_args()
    if not args.default_malloc:
        keep_freed_memory()  # as the usn-offline CLI and the node's proof process run

    use_all_cpu_cores()
    device = resolve_device(args.device)
    model, info = load_checkpoint(args.checkpoint, device)
    data = load_split(args.data, "test", info.preprocess).subset(slice(0, args.images))
    h, w = data.image_hw
    graph = lower(model, (1, h, w), device=device)
    pixels = PixelMap.for_image(data.num_keypoints, h, w, device=device)
    images = [torch.from_numpy(im).to(device, torch.float64)[None, None] for im in data.images]

    x32 = torch.from_numpy(data.images[:1]).to(device)[:, None]
    with torch.no_grad():
        fp = median_seconds(lambda: model(x32), 50, cuda=device.type == "cuda")
    print(f"device {device}, {len(images)} test images, forward pass (float32, batch 1): {fp * 1e3:.2f} ms")

    props = []
    for image in images:
        with torch.no_grad():
            ref = pixels(graph.evaluate(image, torch.ones(1, dtype=torch.float64, device=device),
                                        torch.zeros(1, dtype=torch.float64, device=device)))[0]
        props.append(KeypointProperty(ref, args.delta))

    def table(header, rows):
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        print(" | ".join(h.ljust(wd) for h, wd in zip(header, widths, strict=True)))
        print("-+-".join("-" * wd for wd in widths))
        for r in rows:
            print(" | ".join(str(c).ljust(wd) for c, wd in zip(r, widths, strict=True)))

    # 0. Single-box tightness and time against the reference verifier's CROWN.
    if args.lirpa_eps:
        from usn_offline.certify.bounds import BoundOptions
        from usn_offline.certify.lirpa import LIRPA_MARGIN, lirpa_available
        from usn_offline.certify.standardise import body_of

        if not lirpa_available():
            print("auto_LiRPA not installed: skipping the comparison with its CROWN")
        else:
            # auto_LiRPA has no relaxation of the input standardisation: for a standardising
            # network both verifiers bound its body over a z0 + b, z0 the standardised image.
            # (our input, auto_LiRPA's input) per image: the same image for a plain network.
            body, compared = graph, [(image, image) for image in images[:args.lirpa_images]]
            if graph.standardise is not None:
                body = body_of(graph)
                standardised = [graph.standardise.apply(image) for image in images[:args.lirpa_images]]
                # z0 is signed: our engine takes it as the pixel set (z0, 1, 0, 0).
                compared = [(torch.cat([z, torch.ones_like(z), torch.zeros_like(z), torch.zeros_like(z)], dim=1), z)
                            for z in standardised]
                print("the network standardises its input, which auto_LiRPA cannot bound: both bound its body "
                      "over a z0 + b, z0 the standardised test image (no clip)")
            rows = []
            for eps in args.lirpa_eps:
                box = Boxes.from_boxes([PhotometricBox.symmetric(eps, eps)], device=device)
                ours_w, theirs_w, ours_t, theirs_t, fwd_w = [], [], [], [], []
                for image, lirpa_image in compared:
                    output_bounds(body, lirpa_image, box, pixels, "crown", BoundOptions(backend="auto_lirpa"))
                    t = time.perf_counter()  # (the call before built auto_LiRPA's module: not timed)
                    tlo, thi = output_bounds(body, lirpa_image, box, pixels, "crown",
                                             BoundOptions(backend="auto_lirpa"))
                    theirs_t.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    lo, hi = output_bounds(body, image, box, pixels, "crown", BoundOptions(intermediate="crown"))
                    ours_t.append(time.perf_counter() - t)
                    flo, fhi = output_bounds(body, image, box, pixels, "crown", BoundOptions(intermediate="forward"))
                    # auto_LiRPA's raw width: its bounds without our stated float32 margin.
                    raw = (thi - tlo) - 2 * LIRPA_MARGIN * (1 + torch.maximum(thi.abs(), tlo.abs()))
                    theirs_w.append(float(raw.mean()))
                    ours_w.append(float((hi - lo).mean()))
                    fwd_w.append(float((fhi - flo).mean()))
                med = statistics.median
                rows.append((f"{eps:g}", f"{med(ours_w):.4g}", f"{med(theirs_w):.4g}", f"{med(fwd_w):.4g}",
                             f"{max(o - t for o, t in zip(ours_w, theirs_w, strict=True)):+.1e}",
                             f"{med(ours_t) * 1e3:.0f}", f"{med(theirs_t) * 1e3:.0f}",
                             f"{med(theirs_t) / med(ours_t):.2f}x"))
            print(f"\nOne box, no branching, {min(len(images), args.lirpa_images)} images: median over images of the "
                  "mean keypoint-bound width (px); our CROWN (CROWN intermediate bounds) against auto_LiRPA 0.7.1 "
                  "CROWN (float32, patches mode) and our forward-intermediate CROWN; max over images of "
                  "(ours - theirs); median time per box")
            table(("eps", "ours px", "auto_LiRPA px", "forward px", "max ours-theirs", "ours ms",
                   "auto_LiRPA ms", "speed-up"), rows)

    if args.only_lirpa:
        return
    # 1. One bound computation per image and box (no branching).
    rows = []
    for method in ("ibp", "crown", "alpha-crown"):
        cells = []
        for eps in args.eps:
            box = Boxes.from_boxes([PhotometricBox.symmetric(eps, eps)], device=device)
            certified, times = 0, []
            for image, prop in zip(images, props, strict=True):
                t = time.perf_counter()
                lo, hi = output_bounds(graph, image, box, pixels, method)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                certified += bool(prop.verified(lo, hi)[0])
            per = statistics.median(times)
            cells.append(f"{100 * certified / len(images):.0f} % | {per * 1e3:.0f} ms = {per / fp:.0f} FP")
        rows.append((method, *cells))
    print("\nNo branching: certified fraction | time per image (median) in ms and forward passes")
    table(("method", *[f"eps={e:g}" for e in args.eps]), rows)

    # 2. CROWN with input-space branch and bound.
    cells = []
    for eps in args.eps:
        bab = BabConfig(max_boxes=args.bab_boxes)
        certified, times = 0, []
        for image, prop in zip(images, props, strict=True):
            t = time.perf_counter()
            out = certify_boxes(graph, image, prop, pixels, [PhotometricBox.symmetric(eps, eps)], bab)[0]
            times.append(time.perf_counter() - t)
            certified += out.status is Status.CERTIFIED
        cells.append(f"{100 * certified / len(images):.0f} % | {statistics.median(times):.2f} s")
    print(f"\nCROWN + branch and bound ({args.bab_boxes} boxes max): certified fraction | time per image")
    table(("method", *[f"eps={e:g}" for e in args.eps]), [("crown+bab", *cells)])

    bab = BabConfig(max_boxes=args.bab_boxes)
    strategies = [
        ("frontier", RadiusConfig(eps_max=0.2, strategy="frontier", max_boxes=n), f"{n} boxes in all")
        for n in args.radius_boxes
    ] + [
        ("bisection", RadiusConfig(eps_max=0.2, steps=3, strategy="bisection"),
         f"{args.bab_boxes} boxes per probe, eps from 0.0025 doubling to 0.2, 3 bisections"),
    ]
    rows = []
    for name, radius_cfg, budget in strategies:
        times, radii = [], []
        for image, prop in zip(images[:args.radius_images], props, strict=False):
            res = largest_certified_radius(graph, image, prop, pixels, radius_cfg, bab)
            times.append(res.seconds)
            radii.append(res.certified_eps)
        rows.append((name, f"{statistics.median(times):.2f} s", f"{statistics.median(radii):.4f}",
                     f"{statistics.mean(radii):.4f}", budget))
    print(f"\nLargest certified radius (CROWN + branch and bound), {args.radius_images} images, eps_max 0.2")
    table(("strategy", "median time/image", "median radius", "mean radius", "budget"), rows)

if __name__ == "__main__":
    main()
