"""Build keypoint networks by name from a :class:`ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from usn_offline.errors import ConfigError
from usn_offline.models.cnn7 import CNN7Backbone
from usn_offline.models.config import STANDARDISE_EPS, ModelConfig
from usn_offline.models.heads import RegressionHead
from usn_offline.models.resnet import ResNetBackbone

BACKBONES: dict[str, Callable[..., nn.Module]] = {"cnn7": CNN7Backbone, "resnet": ResNetBackbone}
HEADS: dict[str, Callable[..., nn.Module]] = {"regression": RegressionHead}

# Defaults per family, used when a config gives no widths of its own.
DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {
    "cnn7": (16, 32, 32, 64, 64),
    "resnet": (16, 16, 32, 64),
}


class KeypointNet(nn.Module):
    """backbone -> head; outputs (N, 2K) normalised coordinates in roughly [-1, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family not in BACKBONES:
            raise ConfigError(f"unknown model family '{config.family}' (choose from {sorted(BACKBONES)})")
        if config.head not in HEADS:
            raise ConfigError(f"unknown head '{config.head}' (choose from {sorted(HEADS)})")
        self.config = config
        try:
            self.backbone = BACKBONES[config.family](
                config.in_channels, config.widths, (config.input_height, config.input_width), **config.extra)
        except TypeError as exc:
            raise ConfigError(f"{config.family}: unsupported extra settings {sorted(config.extra)}") from exc
        except ValueError as exc:
            raise ConfigError(f"{config.family}: {exc}") from exc
        self.head = HEADS[config.head](self.backbone.out_shape, config.hidden, config.num_outputs)
        # InstanceNorm2d without affine or running statistics on one channel is exactly the
        # per-image standardisation, and exports to one ONNX InstanceNormalization.
        self.standardise = (nn.InstanceNorm2d(config.in_channels, eps=STANDARDISE_EPS, affine=False)
                            if config.input_norm == "standardise" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardise is not None:
            x = self.standardise(x)
        return self.head(self.backbone(x))


def model_config_for(family: str, **overrides) -> ModelConfig:
    """A ModelConfig with the family's default widths unless ``widths`` is given."""
    if family not in BACKBONES:
        raise ConfigError(f"unknown model family '{family}' (choose from {sorted(BACKBONES)})")
    overrides.setdefault("widths", DEFAULT_WIDTHS[family])
    return ModelConfig(family=family, **overrides)


def build_model(config: ModelConfig) -> KeypointNet:
    return KeypointNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
