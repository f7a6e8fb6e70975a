"""Batches of (a, b) boxes, linear functions of (a, b) over them, and the geometry of
single boxes that branch and bound and the radius search split and tile with.

A linear function of the two perturbation parameters is stored as a tensor of shape
(B, 3, *shape): slot 0 is the coefficient of a, slot 1 of b, slot 2 the constant; B
indexes the boxes of a batch. A box may carry *extra* parameters e_1..e_E, each in an
interval of its own (input sets with more shared degrees of freedom than (a, b), such as
the standardised inputs of :mod:`usn_offline.certify.standardise`); their coefficients
follow the constant, in slots 3..3+E-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from usn_offline.perturb import PhotometricBox


@dataclass
class Boxes:
    """B boxes [a_lo, a_hi] x [b_lo, b_hi] as (B,) tensors, with ``extra_lo``/``extra_hi``
    (B, E) the intervals of E extra parameters (none for photometric boxes)."""

    a_lo: torch.Tensor
    a_hi: torch.Tensor
    b_lo: torch.Tensor
    b_hi: torch.Tensor
    extra_lo: torch.Tensor | None = None
    extra_hi: torch.Tensor | None = None

    @property
    def num_extra(self) -> int:
        return 0 if self.extra_lo is None else int(self.extra_lo.shape[1])

    @classmethod
    def from_boxes(cls, boxes: list[PhotometricBox], dtype=torch.float64, device="cpu") -> Boxes:
        t = torch.tensor([[bx.a_lo, bx.a_hi, bx.b_lo, bx.b_hi] for bx in boxes], dtype=dtype, device=device)
        return cls(t[:, 0], t[:, 1], t[:, 2], t[:, 3])

    def __len__(self) -> int:
        return self.a_lo.shape[0]

    def select(self, idx: torch.Tensor) -> Boxes:
        extra = (None, None) if self.extra_lo is None else (self.extra_lo[idx], self.extra_hi[idx])
        return Boxes(self.a_lo[idx], self.a_hi[idx], self.b_lo[idx], self.b_hi[idx], *extra)

    def to_list(self) -> list[PhotometricBox]:
        rows = torch.stack([self.a_lo, self.a_hi, self.b_lo, self.b_hi], dim=1).tolist()
        return [PhotometricBox(*r) for r in rows]

    def centres(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.a_lo + self.a_hi) / 2, (self.b_lo + self.b_hi) / 2

    def corners(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4) contrast and brightness values of each box's corners."""
        a = torch.stack([self.a_lo, self.a_lo, self.a_hi, self.a_hi], dim=1)
        b = torch.stack([self.b_lo, self.b_hi, self.b_lo, self.b_hi], dim=1)
        return a, b


def _view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(-1, *([1] * ndim))


def _extremes(fn: torch.Tensor, boxes: Boxes, pick) -> torch.Tensor:
    nd = fn.dim() - 2
    if fn.shape[1] != 3 + boxes.num_extra:
        raise ValueError(f"a linear function of {fn.shape[1] - 3} extra parameters over boxes with "
                         f"{boxes.num_extra}")
    ca, cb, c = fn[:, 0], fn[:, 1], fn[:, 2]
    out = (c + pick(ca * _view(boxes.a_lo, nd), ca * _view(boxes.a_hi, nd))
           + pick(cb * _view(boxes.b_lo, nd), cb * _view(boxes.b_hi, nd)))
    for k in range(boxes.num_extra):
        ck = fn[:, 3 + k]
        out = out + pick(ck * _view(boxes.extra_lo[:, k], nd), ck * _view(boxes.extra_hi[:, k], nd))
    return out


def linear_min(fn: torch.Tensor, boxes: Boxes) -> torch.Tensor:
    """Minimum over each box of a linear function (B, 3 + E, *shape) -> (B, *shape)."""
    return _extremes(fn, boxes, torch.minimum)


def linear_max(fn: torch.Tensor, boxes: Boxes) -> torch.Tensor:
    """Maximum over each box of a linear function (B, 3 + E, *shape) -> (B, *shape)."""
    return _extremes(fn, boxes, torch.maximum)


def halves(box: PhotometricBox, scale_a: float, scale_b: float) -> tuple[PhotometricBox, PhotometricBox]:
    """The two halves of ``box`` across its side that is widest in units of the scales."""
    wa = (box.a_hi - box.a_lo) / max(scale_a, 1e-12)
    wb = (box.b_hi - box.b_lo) / max(scale_b, 1e-12)
    if wa >= wb:
        m = (box.a_lo + box.a_hi) / 2
        return PhotometricBox(box.a_lo, m, box.b_lo, box.b_hi), PhotometricBox(m, box.a_hi, box.b_lo, box.b_hi)
    m = (box.b_lo + box.b_hi) / 2
    return PhotometricBox(box.a_lo, box.a_hi, box.b_lo, m), PhotometricBox(box.a_lo, box.a_hi, m, box.b_hi)


def intersect(box: PhotometricBox, to: PhotometricBox) -> PhotometricBox | None:
    """The intersection of two boxes; None when it is empty, or when it is thinner than
    ``to`` in a side where ``to`` has extent (a segment on a shared edge: the network is
    continuous and the property closed, so it holds there once it holds on both sides)."""
    a_lo, a_hi = max(box.a_lo, to.a_lo), min(box.a_hi, to.a_hi)
    b_lo, b_hi = max(box.b_lo, to.b_lo), min(box.b_hi, to.b_hi)
    if a_lo > a_hi or b_lo > b_hi:
        return None
    if (a_lo == a_hi and to.a_lo < to.a_hi) or (b_lo == b_hi and to.b_lo < to.b_hi):
        return None
    return PhotometricBox(a_lo, a_hi, b_lo, b_hi)


def inside(box: PhotometricBox, outer: PhotometricBox) -> bool:
    """Whether ``box`` lies in ``outer`` (edges included)."""
    return outer.a_lo <= box.a_lo and box.a_hi <= outer.a_hi and outer.b_lo <= box.b_lo and box.b_hi <= outer.b_hi


def ring(inner: PhotometricBox, outer: PhotometricBox) -> list[PhotometricBox]:
    """Boxes covering ``outer`` minus the interior of ``inner`` (inner inside outer)."""
    parts = []
    if outer.a_lo < inner.a_lo:
        parts.append(PhotometricBox(outer.a_lo, inner.a_lo, outer.b_lo, outer.b_hi))
    if inner.a_hi < outer.a_hi:
        parts.append(PhotometricBox(inner.a_hi, outer.a_hi, outer.b_lo, outer.b_hi))
    if outer.b_lo < inner.b_lo:
        parts.append(PhotometricBox(inner.a_lo, inner.a_hi, outer.b_lo, inner.b_lo))
    if inner.b_hi < outer.b_hi:
        parts.append(PhotometricBox(inner.a_lo, inner.a_hi, inner.b_hi, outer.b_hi))
    return parts
