"""The concentration phase of USN-WD: soft keep-gates on every prunable neuron, trained
with the task loss plus the Wasserstein concentration loss, started from the USN scores."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from usn_offline.data.dataset import KeypointDataset
from usn_offline.models import KeypointNet
from usn_offline.prune.finetune import finetune
from usn_offline.prune.structural import fold_output_scales, scaled_outputs
from usn_offline.prune.wasserstein import concentration_loss
from usn_offline.train.loop import TrainConfig


@dataclass(frozen=True)
class GateConfig:
    """gate_j = sigmoid(init_logit + prior_strength * standardised log USN_j + learned_j)."""

    weight: float = 1.0  # lambda of the concentration loss
    epochs: int = 1
    lr: float = 5e-4
    gate_lr: float = 0.05
    init_logit: float = 2.0
    prior_strength: float = 1.0


def usn_prior(usn: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """log USN standardised within each layer: low-USN neurons of a layer start with lower
    gates, and no layer starts favoured (raw USN levels differ by depth in ways the
    certification engine does not share; the concentration phase decides across layers)."""
    out = {}
    for k, v in usn.items():
        logs = v.double().clamp(min=1e-6).log()
        std = logs.std() if logs.numel() > 1 else torch.zeros((), dtype=logs.dtype)
        out[k] = ((logs - logs.mean()) / std.clamp(min=1e-12)).float()
    return out


def concentrate(model: KeypointNet, usn: Mapping[str, torch.Tensor], prune_fraction: float,
                train_set: KeypointDataset, train_config: TrainConfig, config: GateConfig,
                device: torch.device, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Train gates + network with task loss + weight * W1(gates, r δ0 + (1-r) δ1); fold the
    final gates into the network (exact) and return them as keep scores."""
    prior = usn_prior(usn)
    logits = {k: nn.Parameter((config.init_logit + config.prior_strength * v).to(device)) for k, v in prior.items()}

    def all_gates() -> torch.Tensor:
        return torch.cat([torch.sigmoid(p) for p in logits.values()])

    def extra_loss() -> torch.Tensor:
        return config.weight * concentration_loss(all_gates(), prune_fraction)

    live = {k: (lambda p=p: torch.sigmoid(p)) for k, p in logits.items()}
    with scaled_outputs(model, live):
        finetune(model, train_set, config.epochs, config.lr, train_config, device, seed=seed,
                 extra_params=list(logits.values()), extra_loss=extra_loss, progress=progress,
                 desc="concentrate", extra_lr=config.gate_lr)
    final = {k: torch.sigmoid(p).detach() for k, p in logits.items()}
    fold_output_scales(model, final)
    return {k: v.cpu().double() for k, v in final.items()}
