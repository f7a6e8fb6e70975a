"""Prunable neuron groups of a keypoint network.

A *neuron* is a channel of a convolution or a unit of a linear layer, identified by the
ReLU that follows it. Removing neuron j removes row j of its producer (the conv/linear,
plus the BatchNorm after it) and the matching input slice of its consumer. Residual
outputs are tied to their shortcut, so in a ResNet only the blocks' inner channels and
the head's hidden units are prunable.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from usn_offline.errors import ConfigError
from usn_offline.models import KeypointNet


@dataclass(frozen=True)
class NeuronGroup:
    """One prunable layer.

    ``relu`` is the module path of the ReLU whose input is the group's pre-activation;
    ``producer`` the module paths whose parameters are indexed by neuron along dim 0 (the
    last one is scaled when a gate is folded in); ``consumer`` the module whose weight is
    indexed along dim 1, ``consumer_span`` columns per neuron (H*W after a Flatten).
    ``config_slot`` says which width of the :class:`ModelConfig` the group sets.
    """

    name: str
    relu: str
    size: int
    producer: tuple[str, ...]
    consumer: str
    consumer_span: int
    config_slot: tuple[str, int | None]


def _cnn7_groups(model: KeypointNet) -> list[NeuronGroup]:
    convs = [i for i, m in enumerate(model.backbone) if isinstance(m, nn.Conv2d)]
    c, h, w = model.backbone.out_shape
    groups = []
    for k, i in enumerate(convs):
        last = k == len(convs) - 1
        groups.append(NeuronGroup(
            name=f"conv{k + 1}", relu=f"backbone.{i + 1}", size=model.backbone[i].out_channels,
            producer=(f"backbone.{i}",), consumer="head.1" if last else f"backbone.{convs[k + 1]}",
            consumer_span=h * w if last else 1, config_slot=("widths", k)))
    return groups


def _resnet_groups(model: KeypointNet) -> list[NeuronGroup]:
    groups = []
    for k, block in enumerate(model.backbone.blocks):
        p = f"backbone.blocks.{k}"
        groups.append(NeuronGroup(
            name=f"block{k + 1}.mid", relu=f"{p}.relu1", size=block.conv1.out_channels,
            producer=(f"{p}.conv1", f"{p}.bn1"), consumer=f"{p}.conv2", consumer_span=1,
            config_slot=("mid_widths", k)))
    return groups


_BACKBONE_GROUPS = {"cnn7": _cnn7_groups, "resnet": _resnet_groups}


def neuron_groups(model: KeypointNet) -> list[NeuronGroup]:
    """The prunable groups of ``model``, input to output; the head's hidden layer last."""
    family = model.config.family
    if family not in _BACKBONE_GROUPS:
        raise ConfigError(f"pruning does not support model family '{family}' "
                          f"(supported: {sorted(_BACKBONE_GROUPS)})")
    head = NeuronGroup(name="head.hidden", relu="head.2", size=model.head[1].out_features,
                       producer=("head.1",), consumer="head.3", consumer_span=1, config_slot=("hidden", None))
    return _BACKBONE_GROUPS[family](model) + [head]
