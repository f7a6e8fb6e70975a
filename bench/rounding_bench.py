"""The float64 rounding bound every reported bound is widened by: its size in pixels and
its cost as a ratio to the CROWN bound it widens (both measured in this process), on
default-width networks of both families (random weights, or a checkpoint of yours).

    python bench/rounding_bench.py [--checkpoint runs/demo/pruned.pt] [--repeat 10]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds  # noqa: E402  (bench/timing.py, beside this script)

from usn_offline.certify import Boxes, PixelMap, lower, output_bounds
from usn_offline.certify.bounds import ROUNDING_FACTOR
from usn_offline.certify.forward import propagate, rounding_error
from usn_offline.certify.standardise import bound_inputs
from usn_offline.models import build_model, model_config_for
from usn_offline.perturb import PhotometricBox


def _networks(checkpoint: str | None):
    if checkpoint:
        from usn_offline.train import load_checkpoint

        model, info = load_checkpoint(checkpoint)
        yield checkpoint, model.eval(), (info.preprocess.input_height, info.preprocess.input_width)
        return
    torch.manual_seed(0)
    for family in ("cnn7", "resnet"):
        for norm in ("none", "standardise"):
            yield f"{family} ({norm}, random)", build_model(model_config_for(family, input_norm=norm)).eval(), (64, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    box = Boxes.from_boxes([PhotometricBox(0.97, 1.03, -0.03, 0.03)])
    print(f"{'network':>28} | {'rounding bound':>14} | {'CROWN width':>11} | {'bound':>8} | {'CROWN':>8} | "
          "bound / CROWN")
    for name, model, (h, w) in _networks(args.checkpoint):
        graph = lower(model, (1, h, w))
        image = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.8 + 0.1
        pixels = PixelMap.for_image(model.config.num_keypoints, h, w)
        body, sets, boxes = bound_inputs(graph, image, box) if graph.standardise is not None else (graph, image, box)
        relus = propagate(body, sets, boxes, linear=False).relu_input
        size = float((ROUNDING_FACTOR * rounding_error(body, sets, boxes, relus) * pixels.scale.abs()).max())
        lo, hi = output_bounds(graph, image, box, pixels, "crown")
        bound = median_seconds(lambda b=body, s=sets, x=boxes, r=relus: rounding_error(b, s, x, r), args.repeat)
        crown = median_seconds(lambda g=graph, i=image, p=pixels: output_bounds(g, i, box, p, "crown"),
                               args.repeat, warmup=1)
        print(f"{name:>28} | {size:11.2e} px | {float((hi - lo).max()):8.3g} px | {bound * 1e3:5.1f} ms | "
              f"{crown * 1e3:5.0f} ms | {bound / crown:.3f}")


if __name__ == "__main__":
    main()
