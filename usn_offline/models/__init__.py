"""Keypoint regression networks: CNN7 and a small ResNet, built by name."""

from usn_offline.models.config import ModelConfig
from usn_offline.models.registry import (
    BACKBONES,
    KeypointNet,
    build_model,
    count_parameters,
    model_config_for,
)

__all__ = ["BACKBONES", "KeypointNet", "ModelConfig", "build_model", "count_parameters",
           "model_config_for"]
