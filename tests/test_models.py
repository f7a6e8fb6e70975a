"""Network families: output shapes, and only operations bound propagation supports."""

import pytest
import torch
from torch import nn

from usn_offline.errors import ConfigError
from usn_offline.models import ModelConfig, build_model, count_parameters, model_config_for
from usn_offline.models.resnet import BasicBlock

SUPPORTED_LEAVES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten, nn.AvgPool2d, nn.BatchNorm2d, nn.Identity)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
@pytest.mark.parametrize("hw,k", [((64, 64), 4), ((48, 80), 6)])
def test_output_shape(family, hw, k):
    model = build_model(model_config_for(family, num_keypoints=k, input_height=hw[0], input_width=hw[1]))
    out = model(torch.rand(3, 1, *hw))
    assert out.shape == (3, 2 * k)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
def test_only_certifiable_operations(family):
    model = build_model(model_config_for(family))
    for module in model.modules():
        if not list(module.children()):
            assert isinstance(module, SUPPORTED_LEAVES), type(module)


def test_cnn7_has_seven_weight_layers():
    model = build_model(model_config_for("cnn7"))
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 7
    assert 100_000 < count_parameters(model) < 5_000_000


def test_resnet_has_residual_blocks():
    model = build_model(model_config_for("resnet"))
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 3


def test_config_round_trip():
    config = model_config_for("resnet", num_keypoints=5, hidden=32)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_bad_configs():
    with pytest.raises(ConfigError, match="unknown model family"):
        model_config_for("vgg")
    with pytest.raises(ConfigError, match="cnn7 needs 5 widths"):
        build_model(ModelConfig(family="cnn7", widths=(8, 8)))
    with pytest.raises(ConfigError, match="num_keypoints"):
        ModelConfig(num_keypoints=0)
