"""Bound-based training: the certification engine's bounds as a training loss.

For each image x of a sub-batch and the box a in [1 - eps, 1 + eps], b in [-eps, eps],
the engine's forward linear bounds (every neuron between two linear functions of
(a, b), intersected with interval bounds: :func:`~usn_offline.certify.forward.propagate`)
bound every keypoint coordinate over clip(a x + b). They are computed on a lowering that
keeps the weights attached to the module's parameters, so they are differentiable; the
loss is the mean of log(1 + width in network pixels) of those bounds, so that early
bounds of thousands of pixels do not swamp the task loss. Minimising it makes the
network's keypoints *provably* flat over the box, which is what certification and the
per-frame proofs need (augmentation only makes them flat on samples). A warm-up ramps
eps and the weight from 0 over the first epochs (as in CROWN-IBP training), so the
network first learns the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from usn_offline.certify.boxes import Boxes
from usn_offline.certify.forward import propagate
from usn_offline.certify.graph import lower
from usn_offline.certify.standardise import bound_inputs
from usn_offline.errors import ConfigError
from usn_offline.perturb import PhotometricBox


@dataclass(frozen=True)
class BoundLossConfig:
    """``weight`` 0 turns it off; ``eps`` is the box half-width reached after
    ``ramp_epochs``; ``images_per_batch`` images of each batch carry it (its cost).

    ``box``, when given, replaces the symmetric eps box (the ramp
    grows it from (1, 0)); ``tiles`` n > 1 gives each image a random tile of the box's
    n x n grid instead of the whole box: branch and bound certifies a wide box through
    small sub-boxes, so that is what the network is made flat on (a standardising network,
    whose bounds over a whole wide box are loose by construction, needs it most)."""

    weight: float = 0.0
    eps: float = 0.05
    ramp_epochs: int = 5
    images_per_batch: int = 16
    box: PhotometricBox | None = None
    tiles: int = 1

    def __post_init__(self) -> None:
        if not (self.weight >= 0 and self.weight < float("inf")):
            raise ConfigError(f"bound loss weight must be a finite number >= 0, got {self.weight}")
        if not 0 < self.eps <= 1:
            raise ConfigError(f"bound loss eps must be in (0, 1], got {self.eps}")
        if self.ramp_epochs < 0 or self.images_per_batch < 1 or self.tiles < 1:
            raise ConfigError("bound loss: ramp_epochs >= 0, images_per_batch >= 1 and tiles >= 1 required")
        if self.box is not None:
            box = self.box  # finite and non-empty: PhotometricBox checks that
            if not (0 < box.a_lo <= 1 <= box.a_hi and -1 < box.b_lo <= 0 <= box.b_hi < 1):
                raise ConfigError(f"bound loss box must hold (1, 0) with 0 < a and |b| < 1, got {self.box}")

    def schedule(self, epoch: int) -> tuple[float, float]:
        """(weight, eps) for ``epoch`` (0-based): both ramp up linearly during the warm-up."""
        ramp = 1.0 if self.ramp_epochs == 0 else min(1.0, (epoch + 1) / self.ramp_epochs)
        return self.weight * ramp, self.eps * ramp

    def term(self, model: nn.Module, batch: torch.Tensor, epoch: int, generator: torch.Generator
             ) -> torch.Tensor | float:
        """The weighted bound loss of ``epoch`` over the batch's first ``images_per_batch``
        images (0 when off): the one term the training loop and pruning's fine-tune add."""
        weight = self.schedule(epoch)[0]
        if weight <= 0:
            return 0.0
        sub = batch[:self.images_per_batch]
        return weight * bound_loss(model, sub, self.training_boxes(epoch, len(sub), generator))

    def training_boxes(self, epoch: int, count: int, generator: torch.Generator) -> list[PhotometricBox]:
        """The boxes of ``count`` images in ``epoch``: the (ramped) box, or a random tile of it each."""
        if self.box is None and self.tiles == 1:
            eps = self.schedule(epoch)[1]
            return [PhotometricBox.symmetric(eps, eps)] * count
        ramp = self.schedule(epoch)[1] / self.eps
        box = self.box or PhotometricBox.symmetric(self.eps, self.eps)
        a_lo, a_hi, b_lo, b_hi = 1 + ramp * (box.a_lo - 1), 1 + ramp * (box.a_hi - 1), ramp * box.b_lo, ramp * box.b_hi
        if self.tiles == 1:
            return [PhotometricBox(a_lo, a_hi, b_lo, b_hi)] * count
        picks = torch.randint(0, self.tiles, (count, 2), generator=generator).tolist()
        da, db = (a_hi - a_lo) / self.tiles, (b_hi - b_lo) / self.tiles
        return [PhotometricBox(a_lo + i * da, a_lo + (i + 1) * da, b_lo + j * db, b_lo + (j + 1) * db)
                for i, j in picks]


def keypoint_bounds(model: nn.Module, images: torch.Tensor, eps: float | list[PhotometricBox], clip: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable lower and upper bounds (N, 2K), normalised coordinates, of the
    network's outputs over clip(a x + b) for a in [1 - eps, 1 + eps], b in [-eps, eps]
    (or over one box per image) and each image x of ``images`` (N, C, H, W). BatchNorm
    uses its running statistics."""
    was_training = model.training
    model.eval()
    try:
        graph = lower(model, tuple(images.shape[1:]), clip=clip, dtype=images.dtype, device=images.device,
                      differentiable=True)
    finally:
        model.train(was_training)
    listed = [PhotometricBox.symmetric(eps, eps)] * len(images) if isinstance(eps, (int, float)) else eps
    boxes = Boxes.from_boxes(listed, images.dtype, images.device)
    fwd = propagate(*bound_inputs(graph, images, boxes), linear=True, intersect_ibp=True)
    return fwd.out_lo, fwd.out_hi


def bound_loss(model: nn.Module, images: torch.Tensor, eps: float | list[PhotometricBox]) -> torch.Tensor:
    """Mean log(1 + bound width in network-input pixels) over the keypoint coordinates."""
    lo, hi = keypoint_bounds(model, images, eps)
    h, w = images.shape[-2:]
    half = torch.tensor([w / 2.0, h / 2.0], dtype=lo.dtype, device=lo.device).repeat(lo.shape[1] // 2)
    return torch.log1p((hi - lo) * half).mean()
