"""Cross-check of the USN score against what the certification engine sees: the fraction
of a neuron's positions whose certified pre-activation bounds over the box cross zero
(unstable ReLUs, which loosen every linear relaxation). High-USN neurons should have few."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr

from usn_offline.certify.boxes import Boxes
from usn_offline.certify.forward import propagate
from usn_offline.certify.graph import lower
from usn_offline.certify.standardise import bound_inputs
from usn_offline.models import KeypointNet
from usn_offline.perturb import PhotometricBox
from usn_offline.prune.groups import NeuronGroup
from usn_offline.prune.usn import UsnStats


@torch.no_grad()
def engine_unstable_fraction(model: KeypointNet, groups: Sequence[NeuronGroup], images: np.ndarray,
                             box: PhotometricBox) -> dict[str, torch.Tensor]:
    """Per neuron, the mean over images and positions of [lower < 0 < upper] for the
    engine's forward linear bounds of its pre-activation over ``box``."""
    cfg = model.config
    graph = lower(model.eval(), (cfg.in_channels, cfg.input_height, cfg.input_width), dtype=torch.float64)
    node_of = {node.name: i for i, node in enumerate(graph.nodes)}
    relu_nodes = {g.name: node_of[g.relu] for g in groups}
    boxes = Boxes.from_boxes([box])
    totals = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    for image in images:
        x = torch.as_tensor(np.asarray(image), dtype=torch.float64).reshape(1, cfg.in_channels, *image.shape[-2:])
        bounds = propagate(*bound_inputs(graph, x, boxes))
        for g in groups:
            lo, hi = bounds.relu_input[relu_nodes[g.name]]
            crossing = ((lo < 0) & (hi > 0)).double().reshape(g.size, -1).mean(dim=1)
            totals[g.name] += crossing
    return {k: v / len(images) for k, v in totals.items()}


@dataclass
class UsnCrossCheck:
    """Spearman rank correlation between USN and the engine's unstable fraction, over the
    neurons that ever activate (dead ones are trivially both "stable" and worthless):
    ``within_layers`` is the size-weighted mean of the per-layer values (what a per-layer
    ranking uses), ``overall`` pools all layers. Negative = high-USN neurons are the ones
    the engine finds stable."""

    within_layers: float
    overall: float
    per_group: dict[str, float]


def _rho(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(spearmanr(x.numpy(), y.numpy()).statistic)


def usn_crosscheck(stats: dict[str, UsnStats], unstable: dict[str, torch.Tensor]) -> UsnCrossCheck:
    alive = {k: s.active > 0 for k, s in stats.items()}
    per_group = {k: _rho(s.score[alive[k]], unstable[k][alive[k]]) for k, s in stats.items()}
    weights = {k: int(alive[k].sum()) for k in stats if per_group[k] == per_group[k]}
    within = (sum(per_group[k] * w for k, w in weights.items()) / sum(weights.values())
              if weights and sum(weights.values()) else float("nan"))
    overall = _rho(torch.cat([s.score[alive[k]] for k, s in stats.items()]),
                   torch.cat([unstable[k][alive[k]] for k in stats]))
    return UsnCrossCheck(within_layers=within, overall=overall, per_group=per_group)
