"""The comparison the method claims: every pruning method at several ratios, each result
certified by the certification engine; a Markdown table, a JSON record and a PNG plot."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from usn_offline.certify import BabConfig, CertifyConfig, ParallelConfig, certify_dataset
from usn_offline.certify.bab import Status
from usn_offline.certify.spec import Reference
from usn_offline.data.dataset import KeypointDataset
from usn_offline.errors import ConfigError
from usn_offline.experiments.crosscheck import engine_unstable_fraction, usn_crosscheck
from usn_offline.models import KeypointNet
from usn_offline.perturb import PhotometricBox
from usn_offline.prune.groups import neuron_groups
from usn_offline.prune.pipeline import METHODS, PruneConfig, PruneResult, prune_model
from usn_offline.prune.usn import perturbation_samples, usn_scores
from usn_offline.train.checkpoint import CheckpointInfo, save_checkpoint
from usn_offline.train.loop import TrainConfig
from usn_offline.train.metrics import evaluate_model

COMPARE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CompareConfig:
    """Methods x ratios; each pruned network is certified on ``num_images`` test images at
    every eps of ``eps_list`` (symmetric boxes a in [1-eps, 1+eps], b in [-eps, eps]):
    certified accuracy = every keypoint provably within ``delta`` px of the ground truth."""

    methods: tuple[str, ...] = METHODS
    ratios: tuple[float, ...] = (0.3, 0.6)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eps_list: tuple[float, ...] = (0.005, 0.01, 0.02)
    delta: float = 3.0
    num_images: int = 20
    bab: BabConfig = field(default_factory=BabConfig)  # budget in boxes and depth, never seconds
    crosscheck_images: int = 8
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # where the images are certified

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown pruning methods {unknown} (choose from {', '.join(METHODS)})")
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ConfigError(f"ratios must be in (0, 1), got {self.ratios}")
        if not self.eps_list:
            raise ConfigError("eps_list must not be empty")


@dataclass
class CompareRow:
    method: str
    ratio: float
    parameters: int
    macs: int
    widths: dict[str, int]
    test_mean_px_error: float
    test_pck: dict[str, float]
    certified: dict[str, float]
    falsified: dict[str, float]
    verify_seconds_mean: float
    prune_seconds: float
    usn_engine_spearman: float
    checkpoint: str


def _certify(model: KeypointNet, test: KeypointDataset, config: CompareConfig, device) -> tuple[dict, dict, float]:
    cert = CertifyConfig(box=PhotometricBox.symmetric(config.eps_list[0], config.eps_list[0]), delta=config.delta,
                         reference=Reference.GROUND_TRUTH, bab=config.bab, eps_list=tuple(config.eps_list))
    report = certify_dataset(model, test, cert, device=device, progress=False, parallel=config.parallel)
    n = len(report.images)
    certified = {f"{e:g}": v for e, v in report.certified_fraction_at().items()}
    falsified = {f"{e:g}": sum(r.certified_at_eps[f"{e:g}"] == Status.FALSIFIED.value for r in report.images) / n
                 for e in config.eps_list}
    return certified, falsified, float(np.mean([r.seconds for r in report.images]))


def _crosscheck(model: KeypointNet, train: KeypointDataset, config: CompareConfig) -> float:
    model = copy.deepcopy(model).cpu()  # the engine's float64 pass runs on the CPU; leave the caller's model be
    groups = neuron_groups(model)
    images = train.images[:config.crosscheck_images]
    box = PhotometricBox.symmetric(config.eps_list[-1], config.eps_list[-1])
    a, b = perturbation_samples(box, config.prune.score_samples, 0)
    stats = usn_scores(model, groups, images, a, b, config.prune.usn_weights)
    return usn_crosscheck(stats, engine_unstable_fraction(model, groups, images, box)).within_layers


def run_comparison(model: KeypointNet, info: CheckpointInfo, train: KeypointDataset, val: KeypointDataset,
                   test: KeypointDataset, config: CompareConfig, out_dir: Path | str,
                   device: torch.device | str = "cpu", train_config: TrainConfig | None = None,
                   progress: bool = True) -> list[CompareRow]:
    """Prune, evaluate and certify every (method, ratio); write results.json, results.md and
    comparison.png into ``out_dir`` (and each pruned checkpoint)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test_subset = test.subset(slice(0, config.num_images))
    runs = [(m, r) for m in config.methods if m != "none" for r in config.ratios]
    if "none" in config.methods:
        runs.insert(0, ("none", 0.0))
    rows = []
    for method, ratio in runs:
        started = time.perf_counter()
        result: PruneResult = prune_model(model, train, val, replace(config.prune, method=method, ratio=ratio),
                                          device=device, train_config=train_config, progress=progress)
        prune_seconds = time.perf_counter() - started
        pruned = result.model.eval()
        name = "unpruned" if method == "none" else f"{method}-{ratio:g}"
        ckpt = out_dir / f"{name}.pt"
        save_checkpoint(ckpt, pruned, replace(info, model=pruned.config,
                                              training={**info.training, "pruning": result.to_dict()}))
        ev = evaluate_model(pruned, test, device, (2.0, 3.0, 5.0))
        certified, falsified, seconds = _certify(pruned, test_subset, config, device)
        last = result.rounds[-1]
        row = CompareRow(method=method, ratio=ratio, parameters=last.parameters, macs=last.macs, widths=last.widths,
                         test_mean_px_error=ev.mean_px_error, test_pck={f"{t:g}px": v for t, v in ev.pck.items()},
                         certified=certified, falsified=falsified, verify_seconds_mean=seconds,
                         prune_seconds=prune_seconds, usn_engine_spearman=_crosscheck(pruned, train, config),
                         checkpoint=str(ckpt))
        rows.append(row)
        if progress:
            print(f"{name}: {row.parameters:,} params, PCK@3px {row.test_pck['3px']:.1%}, certified "
                  + ", ".join(f"{v:.0%}@{k}" for k, v in certified.items()) + f", {seconds:.2f} s/img")
        write_results(rows, config, out_dir)
    return rows


def results_markdown(rows: list[CompareRow], config: CompareConfig) -> str:
    eps = [f"{e:g}" for e in config.eps_list]
    head = (["method", "ratio", "params", "MACs", "PCK@2px", "PCK@3px", "mean px"]
            + [f"cert. acc. ε={e}" for e in eps] + ["verify s/img", "ρ(USN, engine unstable)", "widths"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{r.ratio:.0%}", f"{r.parameters:,}", f"{r.macs / 1e6:.2f} M",
                 f"{r.test_pck['2px']:.1%}", f"{r.test_pck['3px']:.1%}", f"{r.test_mean_px_error:.2f}"]
        cells += [f"{r.certified[e]:.0%}" for e in eps]
        cells += [f"{r.verify_seconds_mean:.2f}", f"{r.usn_engine_spearman:+.2f}",
                  "/".join(str(w) for w in r.widths.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[CompareRow], config: CompareConfig, out_dir: Path) -> None:
    record = {"schema_version": COMPARE_SCHEMA_VERSION, "config": asdict(config), "rows": [asdict(r) for r in rows]}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2, default=str))
    (out_dir / "results.md").write_text(results_markdown(rows, config) + "\n")
    plot_comparison(rows, config, out_dir / "comparison.png")


def plot_comparison(rows: list[CompareRow], config: CompareConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(METHODS, ("tab:red", "tab:orange", "tab:blue", "tab:gray", "black"), strict=True))
    markers = dict(zip(METHODS, ("o", "s", "^", "v", "D"), strict=True))  # tell apart lines that coincide
    styles = ["-", "--", ":", "-."]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        style = "-" if r.method == "none" else styles[config.ratios.index(r.ratio) % len(styles)]
        label = "unpruned" if r.method == "none" else f"{r.method} {r.ratio:.0%}"
        left.plot(config.eps_list, [100 * r.certified[f"{e:g}"] for e in config.eps_list], style,
                  marker=markers[r.method], markerfacecolor="none", markersize=8 - 2 * (style != "-"),
                  color=colours[r.method], label=label)
    left.set_xlabel("ε (a ∈ [1-ε, 1+ε], b ∈ [-ε, ε])")
    left.set_ylabel(f"certified accuracy (%), δ = {config.delta:g} px")
    left.set_title("Certified accuracy vs ε")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    labels = ["unpruned" if r.method == "none" else f"{r.method} {r.ratio:.0%}" for r in rows]
    right.bar(range(len(rows)), [r.verify_seconds_mean for r in rows], color=[colours[r.method] for r in rows])
    right.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    right.set_ylabel("mean verification time per image (s)")
    right.set_title("Verification time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
