"""Output heads. A head maps backbone features to the 2K normalised keypoint coordinates
(x0, y0, x1, y1, ...); another head type (e.g. heatmaps) plugs in through the registry."""

from __future__ import annotations

import math

from torch import nn


class RegressionHead(nn.Sequential):
    """Flatten -> Linear(hidden) -> ReLU -> Linear(2K)."""

    def __init__(self, in_shape: tuple[int, ...], hidden: int, num_outputs: int) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(in_shape), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_outputs),
        )
