"""Which neurons to remove: per-neuron scores for each method (higher = keep) and the
selection of the lowest-scoring neurons under a per-layer floor."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from usn_offline.errors import ConfigError
from usn_offline.models import KeypointNet
from usn_offline.prune.groups import NeuronGroup

ALLOCATIONS = ("global", "uniform")


@torch.no_grad()
def magnitude_scores(model: KeypointNet, groups: Sequence[NeuronGroup]) -> dict[str, torch.Tensor]:
    """L1 norm of each neuron's incoming weights (times its BatchNorm gain), divided by the
    layer's mean so that layers compare (the classic filter-norm criterion)."""
    out = {}
    for g in groups:
        first = model.get_submodule(g.producer[0])
        norm = first.weight.detach().abs().flatten(1).sum(dim=1).double().cpu()
        if len(g.producer) > 1:
            bn = model.get_submodule(g.producer[-1])
            norm = norm * (bn.weight.detach().abs() / (bn.running_var + bn.eps).sqrt()).double().cpu()
        out[g.name] = norm / norm.mean().clamp(min=1e-12)
    return out


def random_scores(groups: Sequence[NeuronGroup], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in groups}


def select_keep(scores: Mapping[str, torch.Tensor], count: int, floors: Mapping[str, int],
                allocation: str = "global") -> dict[str, torch.Tensor]:
    """Indices to keep per group after removing ``count`` lowest-scoring neurons.

    ``global`` ranks all neurons together (the layers lose different fractions);
    ``uniform`` removes the same fraction from every layer. No group drops below its floor.
    """
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got '{allocation}'")
    sizes = {name: s.numel() for name, s in scores.items()}
    removable = {name: max(0, sizes[name] - floors.get(name, 1)) for name in scores}
    if count < 0 or count > sum(removable.values()):
        raise ConfigError(f"cannot remove {count} neurons: at most {sum(removable.values())} "
                          f"can go without emptying a layer below its floor")
    order = {name: torch.argsort(s, stable=True) for name, s in scores.items()}
    quota = dict.fromkeys(scores, 0)
    if allocation == "uniform":
        total = sum(sizes.values())
        shares = {name: count * sizes[name] / total for name in scores}
        quota = {name: min(removable[name], math.floor(shares[name])) for name in scores}
        # Largest remainders first, then wherever room is left.
        for name in sorted(scores, key=lambda n: shares[n] - math.floor(shares[n]), reverse=True):
            if sum(quota.values()) < count and quota[name] < removable[name]:
                quota[name] += 1
    # Fill what is left (all of it for ``global``) by ascending score across layers.
    flat = sorted(((float(scores[name][i]), name, pos) for name in scores
                   for pos, i in enumerate(order[name].tolist()) if pos >= quota[name]),
                  key=lambda t: t[0])
    for _, name, pos in flat:
        if sum(quota.values()) >= count:
            break
        if quota[name] < removable[name] and pos == quota[name]:
            quota[name] += 1
    if sum(quota.values()) < count:  # a skipped neuron became next in line; sweep again
        for name in scores:
            take = min(removable[name] - quota[name], count - sum(quota.values()))
            quota[name] += take
    return {name: order[name][quota[name]:].sort().values for name in scores}
