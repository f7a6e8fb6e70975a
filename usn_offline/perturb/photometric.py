"""Contrast/brightness perturbation shared by training augmentation and certification.

Torch-free: works on numpy arrays and torch tensors alike (both provide ``.clip``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from usn_offline.errors import ConfigError


@dataclass(frozen=True)
class PhotometricBox:
    """A box of contrast factors a in [a_lo, a_hi] and brightness offsets b in [b_lo, b_hi]."""

    a_lo: float
    a_hi: float
    b_lo: float
    b_hi: float

    def __post_init__(self) -> None:
        values = (self.a_lo, self.a_hi, self.b_lo, self.b_hi)
        if not all(np.isfinite(v) for v in values):
            raise ConfigError(f"photometric box has a non-finite bound: {values}")
        if self.a_lo > self.a_hi:
            raise ConfigError(f"contrast range is empty: a_lo={self.a_lo} > a_hi={self.a_hi}")
        if self.b_lo > self.b_hi:
            raise ConfigError(f"brightness range is empty: b_lo={self.b_lo} > b_hi={self.b_hi}")
        if self.a_lo < 0:
            raise ConfigError(f"contrast must be non-negative, got a_lo={self.a_lo}")

    @classmethod
    def symmetric(cls, eps_contrast: float, eps_brightness: float) -> PhotometricBox:
        """The box a in [1 - eps_c, 1 + eps_c], b in [-eps_b, eps_b]."""
        return cls(1.0 - eps_contrast, 1.0 + eps_contrast, -eps_brightness, eps_brightness)

    def contains(self, a: float, b: float) -> bool:
        return self.a_lo <= a <= self.a_hi and self.b_lo <= b <= self.b_hi


def apply_photometric(x: Any, a: Any, b: Any, clip: bool = True) -> Any:
    """Return ``clip(a*x + b, 0, 1)`` (or the unclipped ``a*x + b``).

    ``a`` and ``b`` are scalars or arrays broadcastable against ``x`` (e.g. shape (N,1,1,1)
    for one perturbation per image of a batch).
    """
    y = x * a + b
    return y.clip(0.0, 1.0) if clip else y


def sample_photometric(
    box: PhotometricBox, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw n (a, b) pairs uniformly from the box."""
    a = rng.uniform(box.a_lo, box.a_hi, size=n)
    b = rng.uniform(box.b_lo, box.b_hi, size=n)
    return a, b
