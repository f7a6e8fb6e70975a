"""CNN7: a plain stack of five convolutions and two linear layers with ReLUs.

The family the USN paper evaluates (as in the certified-training literature), scaled to
train and certify on a CPU. Only Conv2d/ReLU/Flatten/Linear, so bound propagation
handles it directly.
"""

from __future__ import annotations

from torch import nn

# (kernel, stride, padding) of the five convolutions: 64 -> 64 -> 32 -> 32 -> 16 -> 8.
_CONV_LAYOUT = ((3, 1, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1), (4, 2, 1))


class CNN7Backbone(nn.Sequential):
    """Five Conv2d+ReLU layers; ``out_shape`` is the (C, H, W) feature shape."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], input_hw: tuple[int, int]) -> None:
        if len(widths) != len(_CONV_LAYOUT):
            raise ValueError(f"cnn7 needs {len(_CONV_LAYOUT)} widths, got {len(widths)}")
        layers: list[nn.Module] = []
        c, (h, w) = in_channels, input_hw
        for width, (k, s, p) in zip(widths, _CONV_LAYOUT, strict=True):
            layers += [nn.Conv2d(c, width, k, stride=s, padding=p), nn.ReLU()]
            c, h, w = width, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        super().__init__(*layers)
        self.out_shape = (c, h, w)
