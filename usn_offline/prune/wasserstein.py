"""The Wasserstein concentration loss.

Compared distributions: the empirical distribution of the soft keep-gates g_j in (0, 1)
of *all* prunable neurons of the network (one distribution across layers), and the
two-point target  T = r δ_0 + (1 - r) δ_1, where r is the fraction of neurons this round
will remove. In one dimension the W1 distance between two equal-size samples is the mean
absolute difference of their sorted values, so the optimal coupling sends the r·n lowest
gates to 0 and all others to 1: the gradient pushes exactly the neurons that are already
weakest anywhere in the network to zero and restores the rest to full strength. Pruning
then removes whole clusters of near-zero neurons — in whichever layers they concentrate —
instead of thinning every layer, and removal costs almost nothing because their
contribution was already trained away.
"""

from __future__ import annotations

import torch

from usn_offline.errors import ConfigError


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W1 distance between the empirical distributions of two equal-size 1-D samples."""
    u, v = u.flatten(), v.flatten()
    if u.numel() != v.numel() or u.numel() == 0:
        raise ConfigError(f"wasserstein_1d needs two non-empty samples of equal size, got {u.numel()}, {v.numel()}")
    return (torch.sort(u).values - torch.sort(v).values).abs().mean()


def two_point_target(n: int, prune_fraction: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """n sorted values: round(r n) zeros, then ones (the target distribution r δ0 + (1-r) δ1)."""
    if not 0.0 <= prune_fraction <= 1.0:
        raise ConfigError(f"prune fraction must be in [0, 1], got {prune_fraction}")
    target = torch.ones(n, dtype=dtype, device=device)
    target[:round(prune_fraction * n)] = 0.0
    return target


def concentration_loss(gates: torch.Tensor, prune_fraction: float) -> torch.Tensor:
    """W1(distribution of all gates, r δ0 + (1 - r) δ1); differentiable in ``gates``."""
    gates = gates.flatten()
    return wasserstein_1d(gates, two_point_target(gates.numel(), prune_fraction, gates.dtype, gates.device))
