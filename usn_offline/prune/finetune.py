"""Fine-tuning of a (pruned) network with the training augmentation, optionally with an
extra loss term and extra parameters (the soft gates of the concentration phase)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from usn_offline.data.dataset import KeypointDataset
from usn_offline.errors import check_finite_loss
from usn_offline.train.bound_loss import BoundLossConfig
from usn_offline.train.loop import TrainConfig, augment_batch, normalised_targets


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
    loss_fn = nn.SmoothL1Loss(beta=train_config.smooth_l1_beta)
    images = torch.from_numpy(train_set.images).unsqueeze(1)
    targets = normalised_targets(train_set)
    history = []
    model.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(len(train_set), generator=gen)
        total = 0.0
        for start in range(0, len(order), train_config.batch_size):
            idx = order[start:start + train_config.batch_size]
            x = augment_batch(images[idx], train_config, gen).to(device)
            loss = loss_fn(model(x), targets[idx].to(device))
            if extra_loss is not None:
                loss = loss + extra_loss()
            if bound is not None:  # at its full weight and box (ramp_epochs): no warm-up
                loss = loss + bound.term(model, x, bound.ramp_epochs, gen)
            value = loss.item()
            check_finite_loss(value, f"{desc} epoch {len(history) + 1}, batch {start // train_config.batch_size + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += value * len(idx)
        history.append(total / len(train_set))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history
