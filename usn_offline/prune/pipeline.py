"""Progressive pruning: rounds of score -> remove -> fine-tune until the target ratio.

Methods: ``usn-wd`` (USN scores, concentration phase with the Wasserstein loss, remove the
lowest gates), ``usn`` (remove the lowest USN scores), ``magnitude`` (filter L1 norm),
``random``, and ``none`` (the unpruned network, for comparisons).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from usn_offline.data.dataset import KeypointDataset
from usn_offline.errors import ConfigError, UsnError
from usn_offline.models import KeypointNet
from usn_offline.perturb import PhotometricBox
from usn_offline.prune.cost import model_cost
from usn_offline.prune.criteria import ALLOCATIONS, magnitude_scores, random_scores, select_keep
from usn_offline.prune.finetune import finetune
from usn_offline.prune.gates import GateConfig, concentrate
from usn_offline.prune.groups import neuron_groups
from usn_offline.prune.structural import prune_structure
from usn_offline.prune.usn import UsnWeights, perturbation_samples, usn_scores
from usn_offline.train.bound_loss import BoundLossConfig
from usn_offline.train.checkpoint import load_checkpoint_info
from usn_offline.train.loop import TrainConfig
from usn_offline.train.metrics import evaluate_model

METHODS = ("usn-wd", "usn", "magnitude", "random", "none")
# Scores rank neurons within a layer; only usn-wd decides how much each layer loses (its
# gates are trained with the task loss and the concentration loss over all layers at once).
DEFAULT_ALLOCATION = {"usn-wd": "global", "usn": "uniform", "magnitude": "uniform", "random": "uniform",
                      "none": "uniform"}


@dataclass(frozen=True)
class PruneConfig:
    """``ratio`` is the fraction of prunable neurons (conv channels, hidden units) removed
    in total, reached in ``rounds`` equal steps, each followed by fine-tuning."""

    method: str = "usn-wd"
    ratio: float = 0.3
    rounds: int = 3
    finetune_epochs: int = 2
    lr: float = 5e-4
    box: PhotometricBox = field(default_factory=lambda: PhotometricBox.symmetric(0.1, 0.1))
    score_images: int = 256
    score_samples: int = 12
    allocation: str | None = None
    min_keep: float = 0.1
    usn_weights: UsnWeights = field(default_factory=UsnWeights)
    gates: GateConfig = field(default_factory=GateConfig)
    seed: int = 0
    # The bound-based loss in the fine-tuning rounds (off by default): without it, pruning a
    # network trained with it undoes much of its certifiability (docs/METHOD.md).
    bound: BoundLossConfig = field(default_factory=BoundLossConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown pruning method '{self.method}' (choose from {', '.join(METHODS)})")
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got '{self.allocation}'")
        if not 0.0 < self.min_keep <= 1.0:
            raise ConfigError(f"min_keep must be in (0, 1], got {self.min_keep}")
        if self.score_images < 1:
            raise ConfigError(f"score_images must be >= 1, got {self.score_images}")

    @property
    def resolved_allocation(self) -> str:
        return self.allocation or DEFAULT_ALLOCATION[self.method]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["allocation"] = self.resolved_allocation
        return d


@dataclass
class RoundResult:
    """The network after a round (round 0 = before pruning)."""

    round: int
    removed_fraction: float
    widths: dict[str, int]
    parameters: int
    macs: int
    val_mean_px_error: float
    val_pck: dict[str, float]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    model: KeypointNet
    config: PruneConfig
    rounds: list[RoundResult]

    def to_dict(self, source_sha256: str | None = None, data: str | None = None) -> dict:
        """The record kept in the pruned checkpoint's JSON (with what it was pruned from)."""
        return {"config": self.config.to_dict(), "rounds": [r.to_dict() for r in self.rounds],
                "source_sha256": source_sha256, "data": data}


def is_current(out: Path | str, source_sha256: str, data: str, config: PruneConfig) -> bool:
    """True when ``out`` is a pruned checkpoint of the same source checkpoint, data and
    settings (so a re-run, e.g. of ``make demo``, can keep it)."""
    out = Path(out)
    if not out.is_file():
        return False
    try:
        record = load_checkpoint_info(out).training.get("pruning", {})
    except UsnError:
        return False
    wanted = json.loads(json.dumps(config.to_dict()))
    return (record.get("source_sha256") == source_sha256 and record.get("data") == data
            and record.get("config") == wanted)


def _snapshot(model: KeypointNet, round_index: int, removed: float, val_set: KeypointDataset,
              device: torch.device, seconds: float) -> RoundResult:
    ev = evaluate_model(model, val_set, device)
    return RoundResult(round=round_index, removed_fraction=removed,
                       widths={g.name: g.size for g in neuron_groups(model)}, **model_cost(model),
                       val_mean_px_error=ev.mean_px_error, val_pck={f"{t:g}px": v for t, v in ev.pck.items()},
                       seconds=seconds)


def neuron_scores(model: KeypointNet, method: str, config: PruneConfig, train_set: KeypointDataset,
                  prune_fraction: float, train_config: TrainConfig, device: torch.device, seed: int,
                  progress: bool) -> dict[str, torch.Tensor]:
    """Keep scores (higher = keep) of every neuron for ``method``; ``usn-wd`` also trains
    the network through its concentration phase (in place)."""
    groups = neuron_groups(model)
    if method == "magnitude":
        return magnitude_scores(model, groups)
    if method == "random":
        return random_scores(groups, seed)
    a, b = perturbation_samples(config.box, config.score_samples, seed)
    images = train_set.images[:config.score_images]
    stats = usn_scores(model, groups, images, a, b, config.usn_weights)
    usn = {name: s.score for name, s in stats.items()}
    if method == "usn":
        return usn
    return concentrate(model, usn, prune_fraction, train_set, train_config, config.gates, device, seed=seed,
                       progress=progress)


def prune_model(model: KeypointNet, train_set: KeypointDataset, val_set: KeypointDataset, config: PruneConfig,
                device: torch.device | str = "cpu", train_config: TrainConfig | None = None,
                progress: bool = True) -> PruneResult:
    """Prune a copy of ``model`` progressively; the input model is left untouched."""
    device = torch.device(device)
    train_config = train_config or TrainConfig()
    model = copy.deepcopy(model).to(device).eval()
    original = {g.name: g.size for g in neuron_groups(model)}
    total = sum(original.values())
    floors = {name: max(1, math.ceil(config.min_keep * size)) for name, size in original.items()}
    rounds = [_snapshot(model, 0, 0.0, val_set, device, 0.0)]
    if config.method == "none" or config.ratio == 0:
        return PruneResult(model=model, config=config, rounds=rounds)
    bar = tqdm(range(1, config.rounds + 1), desc=f"prune {config.method}", unit="round", disable=not progress)
    for r in bar:
        started = time.perf_counter()
        now = sum(g.size for g in neuron_groups(model))
        count = round(config.ratio * total * r / config.rounds) - (total - now)
        if count <= 0:
            continue
        scores = neuron_scores(model, config.method, config, train_set, count / now, train_config, device,
                               seed=config.seed + r, progress=progress)
        keep = select_keep(scores, count, floors, config.resolved_allocation)
        model = prune_structure(model, keep)
        finetune(model, train_set, config.finetune_epochs, config.lr, train_config, device,
                 seed=config.seed + 100 + r, progress=progress, bound=config.bound)
        removed = 1.0 - sum(g.size for g in neuron_groups(model)) / total
        rounds.append(_snapshot(model, r, removed, val_set, device, time.perf_counter() - started))
        bar.set_postfix(removed=f"{removed:.0%}", val_px=f"{rounds[-1].val_mean_px_error:.2f}")
    return PruneResult(model=model.eval(), config=config, rounds=rounds)


def rounds_table(result: PruneResult) -> str:
    """A plain-text table of params / MACs / accuracy per round."""
    lines = [f"{'round':>5} {'removed':>8} {'params':>10} {'MACs':>12} {'val px':>7} "
             + " ".join(f"{'PCK@' + k:>9}" for k in result.rounds[0].val_pck) + "  widths"]
    for r in result.rounds:
        lines.append(f"{r.round:>5} {r.removed_fraction:>8.1%} {r.parameters:>10,} {r.macs:>12,} "
                     f"{r.val_mean_px_error:>7.3f} " + " ".join(f"{v:>9.2%}" for v in r.val_pck.values())
                     + "  " + ",".join(str(w) for w in r.widths.values()))
    return "\n".join(lines)
