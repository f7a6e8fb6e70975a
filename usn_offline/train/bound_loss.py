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

A share of the images (``BoundLossConfig.frame_sets``) can carry the *pixel set of a
relit frame* instead: the image under a random lighting change of the box, rounded to 8
bits, and every nominal image that frame can come from under the box
(:class:`~usn_offline.certify.frame.FramePixelSets`: its clipped pixels are free within
their intervals, each on its own). That is the set the node's per-frame proof bounds. A
network flat over (a, b) boxes need not be flat over it: where the frame clips, the
hidden values vary pixel by pixel, not together, and on the demo's bag such frames
(a glare, a scene with black or white areas) stayed unproved with bounds of hundreds to
thousands of pixels while attacks moved their keypoints by 0.3-1 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from usn_offline.certify.boxes import Boxes
from usn_offline.certify.forward import propagate
from usn_offline.certify.frame import FramePixelSets, inverse_box
from usn_offline.certify.graph import lower
from usn_offline.certify.standardise import bound_inputs
from usn_offline.errors import ConfigError
from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.preprocess import PreprocessConfig


@dataclass(frozen=True)
class BoundLossConfig:
    """``weight`` 0 turns it off; ``eps`` is the box half-width reached after
    ``ramp_epochs``; ``images_per_batch`` images of each batch carry it (its cost).

    ``box``, when given, replaces the symmetric eps box (the ramp
    grows it from (1, 0)); ``tiles`` n > 1 gives each image a random tile of the box's
    n x n grid instead of the whole box: branch and bound certifies a wide box through
    small sub-boxes, so that is what the network is made flat on (a standardising network,
    whose bounds over a whole wide box are loose by construction, needs it most).

    ``frame_sets``: the share of those images whose bound is over the pixel set of the
    image relit by a random change of the (ramped) box instead (module docstring), each
    over a random tile of the ``frame_tiles`` x ``frame_tiles`` grid of the inverse range
    it can come from: the per-frame proof splits that range into a few boxes only (its
    budget is 16), so the tiles are coarser than the (a, b) ones."""

    weight: float = 0.0
    eps: float = 0.05
    ramp_epochs: int = 5
    images_per_batch: int = 16
    box: PhotometricBox | None = None
    tiles: int = 1
    frame_sets: float = 0.0
    frame_tiles: int = 4

    def __post_init__(self) -> None:
        if not (self.weight >= 0 and self.weight < float("inf")):
            raise ConfigError(f"bound loss weight must be a finite number >= 0, got {self.weight}")
        if not 0 < self.eps <= 1:
            raise ConfigError(f"bound loss eps must be in (0, 1], got {self.eps}")
        if self.ramp_epochs < 0 or self.images_per_batch < 1 or self.tiles < 1:
            raise ConfigError("bound loss: ramp_epochs >= 0, images_per_batch >= 1 and tiles >= 1 required")
        if not 0 <= self.frame_sets <= 1 or self.frame_tiles < 1:
            raise ConfigError(f"bound loss: frame_sets must be in [0, 1] and frame_tiles >= 1, got "
                              f"{self.frame_sets} and {self.frame_tiles}")
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
        framed = round(self.frame_sets * len(sub))
        plain = sub[framed:]
        terms = []
        if len(plain):
            terms.append((len(plain), bound_loss(model, plain, self.training_boxes(epoch, len(plain), generator))))
        if framed:
            sets, boxes = frame_sets_of(sub[:framed], self.ramped_box(epoch), self.frame_tiles, generator)
            terms.append((framed, frame_set_loss(model, sets, boxes)))
        return weight * sum(n * term for n, term in terms) / len(sub)

    def ramped_box(self, epoch: int) -> PhotometricBox:
        """The box of ``epoch``: ``box`` (or +-eps) grown from (1, 0) by the warm-up."""
        ramp = self.schedule(epoch)[1] / self.eps
        box = self.box or PhotometricBox.symmetric(self.eps, self.eps)
        return PhotometricBox(1 + ramp * (box.a_lo - 1), 1 + ramp * (box.a_hi - 1), ramp * box.b_lo, ramp * box.b_hi)

    def training_boxes(self, epoch: int, count: int, generator: torch.Generator) -> list[PhotometricBox]:
        """The boxes of ``count`` images in ``epoch``: the (ramped) box, or a random tile of it each."""
        if self.box is None and self.tiles == 1:
            eps = self.schedule(epoch)[1]
            return [PhotometricBox.symmetric(eps, eps)] * count
        ramped = self.ramped_box(epoch)
        a_lo, a_hi, b_lo, b_hi = ramped.a_lo, ramped.a_hi, ramped.b_lo, ramped.b_hi
        if self.tiles == 1:
            return [PhotometricBox(a_lo, a_hi, b_lo, b_hi)] * count
        picks = torch.randint(0, self.tiles, (count, 2), generator=generator).tolist()
        da, db = (a_hi - a_lo) / self.tiles, (b_hi - b_lo) / self.tiles
        return [PhotometricBox(a_lo + i * da, a_lo + (i + 1) * da, b_lo + j * db, b_lo + (j + 1) * db)
                for i, j in picks]


def frame_sets_of(images: torch.Tensor, lighting: PhotometricBox, tiles: int, generator: torch.Generator
                  ) -> tuple[list[FramePixelSets], Boxes]:
    """Per image x of ``images`` (N, 1, H, W) in [0, 1]: the pixel set of the frame
    round(255 clip(a0 x + b0)) of a random (a0, b0) of ``lighting`` (the nominal images it
    can come from), and a random tile of the ``tiles`` x ``tiles`` grid of the (a, b) range
    it can arise at (the inverse of ``lighting``, restricted by the frame): what the
    per-frame proof bounds (:func:`frame_set_bounds`)."""
    if images.shape[1] != 1:
        raise ConfigError(f"frame pixel sets need one-channel images, got {images.shape[1]} channels")
    h, w = images.shape[-2:]
    config = PreprocessConfig(input_height=h, input_width=w)
    inverse = Boxes.from_boxes([inverse_box(lighting)], torch.float64)
    draws = torch.rand(len(images), 2, generator=generator, dtype=torch.float64).tolist()
    picks = torch.randint(0, tiles, (len(images), 2), generator=generator).tolist()
    sets, boxes = [], []
    for x, (u, v), (i, j) in zip(images.detach().cpu().double(), draws, picks, strict=True):
        a0 = lighting.a_lo + u * (lighting.a_hi - lighting.a_lo)
        b0 = lighting.b_lo + v * (lighting.b_hi - lighting.b_lo)
        frame = np.rint(255.0 * np.clip(a0 * x[0].numpy() + b0, 0.0, 1.0)).astype(np.uint8)
        frame_sets = FramePixelSets.of_frame(frame, config, lighting)
        # The true inverse (1/a0, -b0/a0) lies in the restricted range: it is never empty.
        r = frame_sets.restrict(inverse)
        a_lo, b_lo = float(r.a_lo[0]), float(r.b_lo[0])
        da, db = (float(r.a_hi[0]) - a_lo) / tiles, (float(r.b_hi[0]) - b_lo) / tiles
        # A tile of that bounding box may hold no point the frame arises at: then the tile
        # of the true inverse instead. Each is shrunk to where the frame arises, as the proof does.
        true_i = min(tiles - 1, int((1 / a0 - a_lo) / da)) if da > 0 else 0
        true_j = min(tiles - 1, int((-b0 / a0 - b_lo) / db)) if db > 0 else 0
        for ti, tj in ((i, j), (true_i, true_j)):
            tile = frame_sets.restrict(Boxes.from_boxes([PhotometricBox(
                a_lo + ti * da, a_lo + (ti + 1) * da, b_lo + tj * db, b_lo + (tj + 1) * db)]))
            if float(tile.a_lo[0]) <= float(tile.a_hi[0]) and float(tile.b_lo[0]) <= float(tile.b_hi[0]):
                break
        sets.append(frame_sets)
        boxes.append(PhotometricBox(*(float(end[0]) for end in (tile.a_lo, tile.a_hi, tile.b_lo, tile.b_hi))))
    return sets, Boxes.from_boxes(boxes, images.dtype, images.device)


def frame_set_bounds(model: nn.Module, sets: list[FramePixelSets], boxes: Boxes
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable bounds (N, 2K), normalised coordinates, of the network's outputs over
    each frame pixel set and its box (:func:`frame_sets_of`), through the same input
    sets as the per-frame proof (:meth:`FramePixelSets.bound_inputs`)."""
    h, w = sets[0].value.shape[-2:]
    graph = _differentiable_graph(model, (1, h, w), True, boxes.a_lo.dtype, boxes.a_lo.device)
    parts = [frame_sets.bound_inputs(graph, boxes.select(torch.tensor([i])))
             for i, frame_sets in enumerate(sets)]
    body = parts[0][0]
    planes = torch.cat([p[1] for p in parts])
    set_boxes = Boxes(*(torch.cat([getattr(p[2], f) for p in parts]) for f in ("a_lo", "a_hi", "b_lo", "b_hi")))
    fwd = propagate(body, planes, set_boxes, linear=True, intersect_ibp=True)
    return fwd.out_lo, fwd.out_hi


def _differentiable_graph(model: nn.Module, shape: tuple[int, ...], clip: bool, dtype: torch.dtype, device):
    """The engine's lowering of ``model`` with its weights attached to the parameters
    (BatchNorm in eval mode: its running statistics)."""
    was_training = model.training
    model.eval()
    try:
        return lower(model, shape, clip=clip, dtype=dtype, device=device, differentiable=True)
    finally:
        model.train(was_training)


def keypoint_bounds(model: nn.Module, images: torch.Tensor, eps: float | list[PhotometricBox], clip: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable lower and upper bounds (N, 2K), normalised coordinates, of the
    network's outputs over clip(a x + b) for a in [1 - eps, 1 + eps], b in [-eps, eps]
    (or over one box per image) and each image x of ``images`` (N, C, H, W). BatchNorm
    uses its running statistics."""
    graph = _differentiable_graph(model, tuple(images.shape[1:]), clip, images.dtype, images.device)
    listed = [PhotometricBox.symmetric(eps, eps)] * len(images) if isinstance(eps, (int, float)) else eps
    boxes = Boxes.from_boxes(listed, images.dtype, images.device)
    fwd = propagate(*bound_inputs(graph, images, boxes), linear=True, intersect_ibp=True)
    return fwd.out_lo, fwd.out_hi


def bound_loss(model: nn.Module, images: torch.Tensor, eps: float | list[PhotometricBox]) -> torch.Tensor:
    """Mean log(1 + bound width in network-input pixels) over the keypoint coordinates."""
    return _log_width(*keypoint_bounds(model, images, eps), *images.shape[-2:])


def frame_set_loss(model: nn.Module, sets: list[FramePixelSets], boxes: Boxes) -> torch.Tensor:
    """:func:`bound_loss` over frame pixel sets (:func:`frame_sets_of`)."""
    return _log_width(*frame_set_bounds(model, sets, boxes), *sets[0].value.shape[-2:])


def _log_width(lo: torch.Tensor, hi: torch.Tensor, h: int, w: int) -> torch.Tensor:
    half = torch.tensor([w / 2.0, h / 2.0], dtype=lo.dtype, device=lo.device).repeat(lo.shape[1] // 2)
    return torch.log1p((hi - lo) * half).mean()
