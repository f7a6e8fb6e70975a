"""The certified property: every keypoint stays within delta pixels of a reference."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from usn_offline.certify.errors import CertificationError

FALSIFY_TOLERANCE = 1e-9


class Norm(str, Enum):
    LINF = "linf"  # per coordinate: |x - x_ref| <= delta and |y - y_ref| <= delta
    L2 = "l2"  # per keypoint: ||(x, y) - ref|| <= delta


class Reference(str, Enum):
    PREDICTION = "prediction"  # stability: the model's own output on the unperturbed image
    GROUND_TRUTH = "ground_truth"  # correctness


@dataclass
class KeypointProperty:
    """reference (2K,) in pixels (x0, y0, x1, ...), delta in pixels."""

    reference: torch.Tensor
    delta: float
    norm: Norm = Norm.LINF

    def __post_init__(self) -> None:
        if not self.delta >= 0:
            raise CertificationError(f"delta must be >= 0 pixels, got {self.delta}")
        self.norm = Norm(self.norm)

    def verified(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """(B,) True where the bounds (B, 2K) prove the property for the whole box."""
        r = self.reference
        if self.norm is Norm.LINF:
            return ((lo >= r - self.delta) & (hi <= r + self.delta)).all(dim=1)
        # Sound over-approximation of the largest L2 deviation within the bounds.
        dev = torch.maximum((lo - r).abs(), (hi - r).abs())
        per_kp = dev.view(dev.shape[0], -1, 2).pow(2).sum(dim=2)
        return (per_kp <= self.delta ** 2).all(dim=1)

    def violates(self, deviation: torch.Tensor) -> torch.Tensor:
        """A counterexample must exceed delta by more than floating-point noise, so that
        it also breaks the property in exact arithmetic."""
        return deviation > self.delta + FALSIFY_TOLERANCE * (1 + self.delta)

    def deviation(self, px: torch.Tensor) -> torch.Tensor:
        """(N,) largest deviation from the reference of concrete outputs px (N, 2K)."""
        diff = px - self.reference
        if self.norm is Norm.LINF:
            return diff.abs().max(dim=1).values
        return diff.view(diff.shape[0], -1, 2).norm(dim=2).max(dim=1).values
