"""The Unbiased and Smooth Neuron (USN) score.

For a neuron j, an image x and perturbations (a_s, b_s) from the certification box, let
z0 = z_j(x) be its unperturbed pre-activation and z_s = z_j(clip(a_s x + b_s, 0, 1)) the
perturbed ones, at every spatial position p of a conv channel. With the neuron's typical
magnitude  scale_j = sqrt(mean_{x,p} z0^2):

    bias_j     = mean_{x,p} |mean_s z_s - z0| / scale_j          (the perturbation shifts it)
    smooth_j   = mean_{x,p} std_s z_s / scale_j                  (it varies over the box)
    near_j     = mean_{x,p} [ |mean_s z_s| <= kappa std_s z_s ]   (it sits near the ReLU
                                                                   threshold for its spread)
    USN_j      = 1 / (1 + w_b bias_j + w_s smooth_j + w_n near_j)      in (0, 1]

Higher is more stable. A neuron that never activates on any sample (a dead ReLU) gets
USN = 0: it contributes a constant zero, so removing it is free. docs/METHOD.md gives the
reasoning; :class:`UsnWeights` and :func:`usn_from_samples` are the pluggable parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from usn_offline.errors import ConfigError
from usn_offline.models import KeypointNet
from usn_offline.perturb import PhotometricBox, apply_photometric
from usn_offline.prune.groups import NeuronGroup


@dataclass(frozen=True)
class UsnWeights:
    """Weights of the three instability terms in the USN score."""

    bias: float = 1.0
    smooth: float = 1.0
    near: float = 1.0
    # Threshold proximity in units of the neuron's spread over the box. kappa = 3 ranks
    # neurons within a layer like the certification engine's unstable ReLUs do (Spearman
    # +0.87..+0.99 on the demo CNN7, docs/METHOD.md); the sampled straddle test (about
    # kappa = 1.5) misses the near-misses the engine's looser bounds catch.
    kappa: float = 3.0

    def __post_init__(self) -> None:
        if min(self.bias, self.smooth, self.near, self.kappa) < 0:
            raise ConfigError(f"USN weights must be >= 0, got {self}")


@dataclass
class UsnStats:
    """Per-neuron statistics of one group (tensors of shape (C,))."""

    scale: torch.Tensor
    bias: torch.Tensor
    smooth: torch.Tensor
    near: torch.Tensor
    straddle: torch.Tensor
    active: torch.Tensor
    score: torch.Tensor


class UsnAccumulator:
    """Accumulates the USN statistics of one group over batches of images."""

    def __init__(self, channels: int, kappa: float = UsnWeights.kappa) -> None:
        zeros = lambda: torch.zeros(channels, dtype=torch.float64)  # noqa: E731
        self.sq, self.shift, self.spread, self.near, self.straddle, self.active = (zeros() for _ in range(6))
        self.kappa = kappa
        self.count = 0
        self.samples = 0

    def add(self, z0: torch.Tensor, z: torch.Tensor) -> None:
        """z0: (N, C, P) unperturbed, z: (N, S, C, P) perturbed pre-activations."""
        if z.dim() != 4 or z0.shape != (z.shape[0], z.shape[2], z.shape[3]):
            raise ConfigError(f"expected z0 (N, C, P) and z (N, S, C, P), got {tuple(z0.shape)}, {tuple(z.shape)}")
        z0, z = z0.double(), z.double()
        self.sq += (z0 ** 2).sum(dim=(0, 2))
        self.shift += (z.mean(dim=1) - z0).abs().sum(dim=(0, 2))
        mean, std = z.mean(dim=1), z.std(dim=1, unbiased=False)
        self.spread += std.sum(dim=(0, 2))
        self.near += (mean.abs() <= self.kappa * std).double().sum(dim=(0, 2))
        self.straddle += ((z.amin(dim=1) < 0) & (z.amax(dim=1) > 0)).double().sum(dim=(0, 2))
        self.active += (z > 0).double().sum(dim=(0, 1, 3)) + (z0 > 0).double().sum(dim=(0, 2))
        self.count += z0.shape[0] * z0.shape[2]
        self.samples += z0.shape[0] * z0.shape[2] * (z.shape[1] + 1)

    def result(self, weights: UsnWeights = UsnWeights()) -> UsnStats:
        if self.count == 0:
            raise ConfigError("no samples were accumulated")
        scale = (self.sq / self.count).sqrt().clamp(min=1e-12)
        bias = self.shift / self.count / scale
        smooth = self.spread / self.count / scale
        near = self.near / self.count
        active = self.active / self.samples
        score = 1.0 / (1.0 + weights.bias * bias + weights.smooth * smooth + weights.near * near)
        score = torch.where(active > 0, score, torch.zeros_like(score))
        return UsnStats(scale=scale, bias=bias, smooth=smooth, near=near, straddle=self.straddle / self.count,
                        active=active, score=score)


def usn_from_samples(z0: torch.Tensor, z: torch.Tensor, weights: UsnWeights = UsnWeights()) -> UsnStats:
    """USN statistics from explicit pre-activations: z0 (N, C, P), z (N, S, C, P)."""
    acc = UsnAccumulator(z0.shape[1], weights.kappa)
    acc.add(z0, z)
    return acc.result(weights)


def perturbation_samples(box: PhotometricBox, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (a, b) points of the box: its four corners, then uniform samples."""
    if count < 4:
        raise ConfigError(f"need at least 4 perturbation samples (the corners), got {count}")
    rng = np.random.default_rng(seed)
    a = np.concatenate([[box.a_lo, box.a_lo, box.a_hi, box.a_hi], rng.uniform(box.a_lo, box.a_hi, count - 4)])
    b = np.concatenate([[box.b_lo, box.b_hi, box.b_lo, box.b_hi], rng.uniform(box.b_lo, box.b_hi, count - 4)])
    return a, b


@torch.no_grad()
def usn_scores(model: KeypointNet, groups: Sequence[NeuronGroup], images: np.ndarray | torch.Tensor,
               a: Sequence[float], b: Sequence[float], weights: UsnWeights = UsnWeights(), clip: bool = True,
               batch_size: int = 16) -> dict[str, UsnStats]:
    """USN statistics of every group over ``images`` (N, H, W) or (N, C, H, W) in [0, 1] and
    the perturbations (a[s], b[s])."""
    device = next(model.parameters()).device
    x_all = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x_all.dim() == 3:
        x_all = x_all.unsqueeze(1)
    av = torch.as_tensor(np.asarray(a, np.float32)).view(-1, 1, 1, 1)
    bv = torch.as_tensor(np.asarray(b, np.float32)).view(-1, 1, 1, 1)
    s = av.shape[0]
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for g in groups:
        def hook(_module, inputs, _output, name=g.name):
            captured[name] = inputs[0]
        handles.append(model.get_submodule(g.relu).register_forward_hook(hook))
    accs = {g.name: UsnAccumulator(g.size, weights.kappa) for g in groups}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x_all), batch_size):
            x = x_all[start:start + batch_size]
            n = x.shape[0]
            perturbed = apply_photometric(x.unsqueeze(1), av.unsqueeze(0), bv.unsqueeze(0), clip=clip)
            model(torch.cat([x, perturbed.reshape(n * s, *x.shape[1:])]).to(device))
            for g in groups:
                z = captured[g.name].reshape(n * (s + 1), g.size, -1).cpu()
                accs[g.name].add(z[:n], z[n:].reshape(n, s, g.size, -1))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: acc.result(weights) for name, acc in accs.items()}
