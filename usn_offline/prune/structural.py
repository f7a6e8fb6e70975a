"""Structural pruning: rebuild a smaller network without the removed neurons.

The result computes exactly the function of the original with those neurons' outputs
forced to zero (see :func:`masked`), so any accuracy change comes from the removal
itself, never from the rebuild.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace

import torch

from usn_offline.errors import ConfigError
from usn_offline.models import KeypointNet, build_model
from usn_offline.prune.groups import NeuronGroup, neuron_groups


def _check_keep(group: NeuronGroup, keep: torch.Tensor) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().sort().values
    if keep.numel() < 1:
        raise ConfigError(f"{group.name}: at least one neuron must be kept")
    if keep.min() < 0 or keep.max() >= group.size or keep.unique().numel() != keep.numel():
        raise ConfigError(f"{group.name}: keep indices must be distinct and in [0, {group.size})")
    return keep


def _consumer_columns(group: NeuronGroup, keep: torch.Tensor) -> torch.Tensor:
    span = group.consumer_span
    return (keep[:, None] * span + torch.arange(span)).flatten()


def prune_structure(model: KeypointNet, keep: Mapping[str, torch.Tensor]) -> KeypointNet:
    """A new, smaller network keeping neurons ``keep[group.name]`` (all of a group not named)."""
    groups = {g.name: g for g in neuron_groups(model)}
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise ConfigError(f"unknown neuron groups {unknown} (model has {sorted(groups)})")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = model.config
    widths, extra = list(config.widths), dict(config.extra)
    hidden = config.hidden
    for name, indices in keep.items():
        group = groups[name]
        idx = _check_keep(group, indices)
        for prefix in group.producer:
            for key in [k for k in state if k.startswith(prefix + ".")]:
                if state[key].dim() >= 1 and state[key].shape[0] == group.size:
                    state[key] = state[key][idx].clone()
        weight = f"{group.consumer}.weight"
        state[weight] = state[weight][:, _consumer_columns(group, idx)].clone()
        slot, position = group.config_slot
        if slot == "widths":
            widths[position] = len(idx)
        elif slot == "hidden":
            hidden = len(idx)
        else:  # a per-block inner width kept in ``extra``
            values = list(extra.get(slot) or [g.size for g in groups.values() if g.config_slot[0] == slot])
            values[position] = len(idx)
            extra[slot] = values
    smaller = build_model(replace(config, widths=tuple(widths), hidden=hidden, extra=extra))
    smaller.load_state_dict(state)
    return smaller.to(next(model.parameters()).device).train(model.training)


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


@contextlib.contextmanager
def scaled_outputs(model: KeypointNet, scales: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]]
                   ) -> Iterator[None]:
    """Within the block, multiply each group's post-ReLU outputs by ``scales[name]`` (one
    factor per neuron, or a function returning them that is called at every forward pass;
    differentiable, so gates can be trained through it)."""
    groups = {g.name: g for g in neuron_groups(model)}
    handles = []
    for name, factor in scales.items():
        group = groups[name]

        def hook(_module, _inputs, output, factor=factor):
            shape = (1, -1) + (1,) * (output.dim() - 2)
            value = factor() if callable(factor) else factor
            return output * value.to(output.dtype).view(shape)

        handles.append(_module(model, group.relu).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def masked(model: KeypointNet, keep: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, the neurons not in ``keep`` output zero."""
    groups = {g.name: g for g in neuron_groups(model)}
    device = next(model.parameters()).device
    masks = {}
    for name, indices in keep.items():
        mask = torch.zeros(groups[name].size, device=device)
        mask[_check_keep(groups[name], indices)] = 1.0
        masks[name] = mask
    with scaled_outputs(model, masks):
        yield


@torch.no_grad()
def fold_output_scales(model: KeypointNet, scales: Mapping[str, torch.Tensor]) -> None:
    """Make the scaling of :func:`scaled_outputs` permanent, in place.

    relu(g z) = g relu(z) for g >= 0, so scaling the producer's last affine map (the conv
    or linear, or the BatchNorm after it) by g along its output dimension is exact.
    """
    groups = {g.name: g for g in neuron_groups(model)}
    for name, factor in scales.items():
        if (factor < 0).any():
            raise ConfigError(f"{name}: output scales must be >= 0 to fold through a ReLU")
        last = _module(model, groups[name].producer[-1])
        f = factor.to(last.weight.device, last.weight.dtype)
        last.weight.mul_(f.view((-1,) + (1,) * (last.weight.dim() - 1)))
        if last.bias is not None:
            last.bias.mul_(f)
