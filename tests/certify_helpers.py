"""Helpers shared by the certification tests."""

from __future__ import annotations

import torch
from torch import nn

from usn_offline.certify import PixelMap
from usn_offline.certify.graph import Graph


def nominal_pixels(graph: Graph, image: torch.Tensor, pixels: PixelMap) -> torch.Tensor:
    """The network's keypoints (2K,) in pixels on the unperturbed image (a = 1, b = 0): the
    stability reference."""
    one = torch.ones(1, dtype=graph.dtype, device=image.device)
    with torch.no_grad():
        return pixels(graph.evaluate(image, one, torch.zeros_like(one)))[0]


def randomise_batchnorms(model: nn.Module, mean: float = 0.3, var: tuple[float, float] = (0.5, 2.0),
                         weight: tuple[float, float] = (0.5, 1.5), bias: float = 0.2) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (a fresh one is the
    identity, which hides folding mistakes); returns the model in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-mean, mean)
                m.running_var.uniform_(*var)
                m.weight.uniform_(*weight)
                m.bias.uniform_(-bias, bias)
    return model.eval()


def random_model(family: str, seed: int, size: int = 16, input_norm: str = "none") -> nn.Module:
    """A small random CNN7 or ResNet (2 keypoints, size x size gray input) with non-trivial
    BatchNorms, in eval mode; ``input_norm="standardise"``: with input standardisation."""
    from usn_offline.models import build_model, model_config_for

    torch.manual_seed(seed)
    widths = (3, 4, 4, 5, 5) if family == "cnn7" else (3, 4, 5)
    model = build_model(model_config_for(family, num_keypoints=2, input_height=size, input_width=size,
                                         widths=widths, hidden=12, input_norm=input_norm))
    return randomise_batchnorms(model)


def sample_image(seed: int, size: int = 16) -> torch.Tensor:
    """A random gray image (1, 1, size, size) with black and white corners, which exercise
    the clip relaxation."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 1, size, size, generator=g, dtype=torch.float64)
    img[0, 0, :3, :3] = 0.0
    img[0, 0, -3:, -3:] = 1.0
    return img
