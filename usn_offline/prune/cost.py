"""Size and compute of a network: parameters and multiply-accumulates per forward pass."""

from __future__ import annotations

import math

import torch
from torch import nn

from usn_offline.models import KeypointNet, count_parameters


@torch.no_grad()
def count_macs(model: KeypointNet) -> int:
    """Multiply-accumulates of one forward pass on one image (conv and linear layers)."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += output[0].numel() * per_output
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    cfg = model.config
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()(torch.zeros(1, cfg.in_channels, cfg.input_height, cfg.input_width, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def model_cost(model: KeypointNet) -> dict[str, int]:
    return {"parameters": count_parameters(model), "macs": count_macs(model)}
