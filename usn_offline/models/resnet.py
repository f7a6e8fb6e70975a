"""A small ResNet: residual blocks with BatchNorm (folded into the convolutions for
certification), then average pooling to a small spatial grid.

Spatial structure is kept (2x2 average pooling instead of global pooling) because the
head regresses positions.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (1x1 conv + BN when the shape changes) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, mid_channels: int | None = None
                 ) -> None:
        super().__init__()
        # The inner width is free (pruning shrinks it); the output width is tied to the shortcut.
        mid = out_channels if mid_channels is None else mid_channels
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """Stem (conv-BN-ReLU) then one BasicBlock per width (stride 2 from the second on),
    then 2x2 average pooling. ``widths[0]`` is the stem width; ``mid_widths`` (one per block,
    default equal to the block's width) are the blocks' inner widths."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], input_hw: tuple[int, int],
                 mid_widths: tuple[int, ...] | list[int] | None = None) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"resnet needs at least 2 widths (stem + blocks), got {len(widths)}")
        mids = list(widths[1:]) if mid_widths is None else [int(m) for m in mid_widths]
        if len(mids) != len(widths) - 1 or min(mids) < 1:
            raise ValueError(f"mid_widths needs {len(widths) - 1} positive widths, got {mid_widths}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        h, w = (input_hw[0] + 1) // 2, (input_hw[1] + 1) // 2
        blocks = []
        c = widths[0]
        for i, width in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks.append(BasicBlock(c, width, stride, mids[i]))
            c = width
            if stride == 2:
                h, w = (h + 1) // 2, (w + 1) // 2
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AvgPool2d(2)
        self.out_shape = (c, h // 2, w // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))
