"""The operations a network is lowered to for certification.

Each affine op provides the three things bound propagation needs: ``apply`` (W x + b),
``apply_abs`` (|W| x, no bias) for interval/forward-linear propagation and ``transpose``
(W^T lambda) plus ``bias_dot`` (lambda . b) for the backward (CROWN) pass. All tensors
are float64 unless the engine was asked otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class AffineOp:
    """y = W x + b for one input node."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def apply(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def apply_abs(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transpose(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bias_dot(self, lam: torch.Tensor) -> torch.Tensor:
        """Sum of lambda * b over the output dims: (N, *out_shape) -> (N,)."""
        raise NotImplementedError


@dataclass
class Conv2dOp(AffineOp):
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.abs_weight = self.weight.abs()
        k = self.weight.shape[2:]
        self.output_padding = tuple(
            self.in_shape[1 + i] - ((self.out_shape[1 + i] - 1) * self.stride[i] - 2 * self.padding[i] + k[i])
            for i in range(2))

    def apply(self, x, bias=True):
        return F.conv2d(x, self.weight, self.bias if bias else None, self.stride, self.padding)

    def apply_abs(self, x):
        return F.conv2d(x, self.abs_weight, None, self.stride, self.padding)

    def transpose(self, lam):
        # The gradient kernel computes the same W^T lambda as conv_transpose2d, but without
        # zero-filling one im2col buffer for the whole batch (float64 on CPU: that fill was
        # a third of a CROWN bound's time, bench/certify_bench.py).
        return torch.nn.grad.conv2d_input((lam.shape[0], *self.in_shape), self.weight, lam,
                                          self.stride, self.padding)

    def bias_dot(self, lam):
        if self.bias is None:
            return lam.new_zeros(lam.shape[0])
        return (lam.sum(dim=(2, 3)) * self.bias).sum(dim=1)


@dataclass
class LinearOp(AffineOp):
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.abs_weight = self.weight.abs()

    def apply(self, x, bias=True):
        return F.linear(x, self.weight, self.bias if bias else None)

    def apply_abs(self, x):
        return F.linear(x, self.abs_weight)

    def transpose(self, lam):
        return lam @ self.weight

    def bias_dot(self, lam):
        return lam @ self.bias if self.bias is not None else lam.new_zeros(lam.shape[0])


@dataclass
class ChannelAffineOp(AffineOp):
    """y = scale[c] * x + shift[c] per channel (an unfolded BatchNorm, or a constant shift)."""

    scale: torch.Tensor  # (C,)
    shift: torch.Tensor  # (C,)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (len(self.in_shape) - 1)))

    def apply(self, x, bias=True):
        y = x * self._view(self.scale)
        return y + self._view(self.shift) if bias else y

    def apply_abs(self, x):
        return x * self._view(self.scale.abs())

    def transpose(self, lam):
        return lam * self._view(self.scale)

    def bias_dot(self, lam):
        return (lam * self._view(self.shift)).flatten(1).sum(dim=1)


@dataclass
class AvgPool2dOp(AffineOp):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        c = self.in_shape[0]
        self.weight = None  # built lazily with the right dtype/device
        self.channels = c
        k = self.kernel
        self.output_padding = tuple(
            self.in_shape[1 + i] - ((self.out_shape[1 + i] - 1) * self.stride[i] + k[i]) for i in range(2))

    def _w(self, like: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype != like.dtype or self.weight.device != like.device:
            self.weight = torch.full((self.channels, 1, *self.kernel), 1.0 / math.prod(self.kernel),
                                     dtype=like.dtype, device=like.device)
        return self.weight

    def apply(self, x, bias=True):
        return F.avg_pool2d(x, self.kernel, self.stride)

    def apply_abs(self, x):
        return F.avg_pool2d(x, self.kernel, self.stride)

    def transpose(self, lam):
        return F.conv_transpose2d(lam, self._w(lam), None, self.stride, 0, self.output_padding,
                                  groups=self.channels)

    def bias_dot(self, lam):
        return lam.new_zeros(lam.shape[0])


@dataclass
class FlattenOp(AffineOp):
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def apply(self, x, bias=True):
        return x.reshape(x.shape[0], -1)

    def apply_abs(self, x):
        return x.reshape(x.shape[0], -1)

    def transpose(self, lam):
        return lam.reshape(lam.shape[0], *self.in_shape)

    def bias_dot(self, lam):
        return lam.new_zeros(lam.shape[0])


@dataclass
class AddOp:
    """y = sum_k coeffs[k] * x_k (residual connections; the clip's relu(z) - relu(z - 1))."""

    coeffs: tuple[float, ...]
    out_shape: tuple[int, ...]


@dataclass
class ReluOp:
    out_shape: tuple[int, ...]


@dataclass
class SemanticInputOp:
    """z = a * x + b for the image x of each batch entry: exactly linear in (a, b).

    An entry may instead be a *pixel set* (:func:`input_terms`): z = a * x + b * m + c
    with c anywhere in [c_lo, c_hi] per pixel, for pixels whose value is only partly
    known (a frame's clipped pixels, camera rounding)."""

    out_shape: tuple[int, ...]


InputTerms = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def fan_in(op: AffineOp) -> int:
    """How many products each output of an affine op sums (its rounding grows with it)."""
    if isinstance(op, (Conv2dOp, LinearOp)):
        return int(op.weight[0].numel())
    if isinstance(op, AvgPool2dOp):
        return int(math.prod(op.kernel))
    return 1


def input_terms(images: torch.Tensor, channels: int) -> InputTerms:
    """(x, m, c_lo, c_hi) of a batch of network inputs (B, C', H, W).

    C' = C: plain images, z = a x + b (m, c_lo and c_hi are None). C' = (4 + E) C: pixel
    sets, the planes x, m, c_lo, c_hi stacked along the channels, z = a x + b m + c with
    c_lo <= c <= c_hi, then E planes of extra parameters (:func:`extra_terms`). Plain images
    need x >= 0 (extremes at the box corners); pixel sets may be signed.
    """
    if images.shape[1] == channels:
        return images, None, None, None
    if images.shape[1] < 4 * channels or images.shape[1] % channels:
        raise ValueError(f"network input has {images.shape[1]} channels; expected {channels} (an image) "
                         f"or {4 * channels} or more (a pixel set)")
    x, m, c_lo, c_hi = images[:, :4 * channels].split(channels, dim=1)
    return x, m, c_lo, c_hi


def extra_terms(images: torch.Tensor, channels: int) -> list[torch.Tensor]:
    """The planes X_k (B, C, H, W) of a pixel set's extra parameters: z gets sum_k e_k X_k,
    e_k in the box's k-th extra interval (:class:`~usn_offline.certify.boxes.Boxes`)."""
    if images.shape[1] <= 4 * channels:
        return []
    return list(images[:, 4 * channels:].split(channels, dim=1))
