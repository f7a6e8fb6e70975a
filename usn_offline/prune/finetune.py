"""Fine-tuning of a (pruned) network with the training augmentation, optionally with an
extra loss term and extra parameters (the soft gates of the concentration phase)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from usn_offline.data.dataset import KeypointDataset
from usn_offline.train.bound_loss import BoundLossConfig
from usn_offline.train.loop import TrainConfig, normalised_targets, train_epoch


def finetune(model: nn.Module, train_set: KeypointDataset, epochs: int, lr: float, train_config: TrainConfig,
             device: torch.device, seed: int = 0, extra_params: Sequence[nn.Parameter] = (),
             extra_loss: Callable[[], torch.Tensor] | None = None, progress: bool = True,
             desc: str = "finetune", extra_lr: float | None = None,
             bound: BoundLossConfig | None = None) -> list[float]:
    """Train ``model`` in place for ``epochs`` epochs (cosine-decayed AdamW); returns the
    mean loss per epoch. ``bound`` (weight > 0): the bound-based loss at its full box
    (no warm-up: the network was trained already)."""
    if epochs < 1:
        return []
    gen = torch.Generator().manual_seed(seed)
    param_groups = [{"params": list(model.parameters()), "lr": lr, "weight_decay": train_config.weight_decay}]
    if extra_params:
        param_groups.append({"params": list(extra_params), "lr": extra_lr or lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(param_groups)
    steps = epochs * ((len(train_set) + train_config.batch_size - 1) // train_config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    images = torch.from_numpy(train_set.images).unsqueeze(1)
    targets = normalised_targets(train_set)
    history = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        # The bound loss at its full weight and box (ramp_epochs): no warm-up.
        history.append(train_epoch(model, images, targets, train_config, gen, device, optimizer, scheduler,
                                   bound=bound, bound_epoch=bound.ramp_epochs if bound is not None else 0,
                                   extra_loss=extra_loss, where=f"{desc} epoch {epoch + 1}"))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history
