"""Helpers shared by the certification tests."""

from __future__ import annotations

import torch

from usn_offline.certify import PixelMap
from usn_offline.certify.graph import Graph


def nominal_pixels(graph: Graph, image: torch.Tensor, pixels: PixelMap) -> torch.Tensor:
    """The network's keypoints (2K,) in pixels on the unperturbed image (a = 1, b = 0): the
    stability reference."""
    one = torch.ones(1, dtype=graph.dtype, device=image.device)
    with torch.no_grad():
        return pixels(graph.evaluate(image, one, torch.zeros_like(one)))[0]
