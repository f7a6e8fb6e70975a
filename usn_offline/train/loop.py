"""Training loop: regression of normalised keypoints with photometric augmentation,
deterministic seeding, per-epoch checkpoints and resume."""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from usn_offline.data.augmentation import GeometricAugmentation
from usn_offline.data.dataset import KeypointDataset
from usn_offline.errors import CheckpointError, ConfigError, TrainingError, check_finite_loss, first_line
from usn_offline.models import KeypointNet, ModelConfig, build_model
from usn_offline.perturb import apply_photometric
from usn_offline.runtime.preprocess import PreprocessConfig, pixels_to_normalised
from usn_offline.train.bound_loss import BoundLossConfig
from usn_offline.train.checkpoint import CheckpointInfo, config_path, save_checkpoint
from usn_offline.train.device import resolve_device, use_all_cpu_cores
from usn_offline.train.metrics import evaluate_predictions, predict_pixels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and augmentation settings."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    # Random contrast a and brightness b per image: x' = clip(a*x + b, 0, 1).
    augment_contrast: tuple[float, float] = (0.6, 1.4)
    augment_brightness: tuple[float, float] = (-0.25, 0.25)
    augment_probability: float = 0.8
    # Geometric augmentation, off by default: each image turned by up to +-this many degrees
    # and scaled by a factor in augment_scale about its centre, its keypoints moved with it
    # (an image whose keypoints would leave the frame is left as it is). No flips: those need
    # the keypoint order remapped.
    augment_rotation_deg: float = 0.0
    augment_scale: tuple[float, float] = (1.0, 1.0)
    # Horizontal mirroring of half the images, these keypoint index pairs exchanged (None:
    # off); only for a target whose mirror image is a view of itself (data/augmentation.py).
    augment_flip_pairs: tuple[tuple[int, int], ...] | None = None
    smooth_l1_beta: float = 0.01
    # Bound-based (certifiable) training: off unless bound.weight > 0 (train/bound_loss.py).
    bound: BoundLossConfig = field(default_factory=BoundLossConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.augment_probability <= 1.0:
            raise ConfigError(f"augment_probability must be in [0, 1], got {self.augment_probability}")
        lo, hi = self.augment_contrast
        if not 0 <= lo <= hi:
            raise ConfigError(f"augment_contrast must satisfy 0 <= lo <= hi, got {self.augment_contrast}")
        if self.augment_brightness[0] > self.augment_brightness[1]:
            raise ConfigError(f"augment_brightness range is empty: {self.augment_brightness}")
        if not 0.0 <= self.augment_rotation_deg <= 180.0:
            raise ConfigError(f"augment_rotation_deg must be in [0, 180], got {self.augment_rotation_deg}")
        if not 0 < self.augment_scale[0] <= self.augment_scale[1] < float("inf"):
            raise ConfigError(f"augment_scale must satisfy 0 < lo <= hi, got {self.augment_scale}")

    def with_geometric(self, geometric: GeometricAugmentation) -> TrainConfig:
        """This config with ``geometric``'s rotation, scale and mirroring."""
        return replace(self, augment_rotation_deg=geometric.rotation_deg, augment_scale=tuple(geometric.scale),
                       augment_flip_pairs=geometric.flip_pairs)


@dataclass
class TrainResult:
    checkpoint: Path
    epochs_run: int
    final_train_loss: float
    val_mean_px_error: float
    loss_history: list[float]
    seconds: float


# A network whose keypoints move less than this (network pixels, the largest standard
# deviation of any coordinate over the validation images) has collapsed to a constant
# output: dead ReLUs leave only the head's bias, which gives exactly zero.
COLLAPSED_SPREAD_PX = 0.01


def collapse_message(predictions: np.ndarray, val_set: KeypointDataset) -> str | None:
    """Why a trained network is useless when its ``predictions`` (N, K, 2 pixels) are the
    same keypoints for every validation image although their labels differ; None when not."""
    if len(val_set) < 2:
        return None
    spread = float(np.asarray(predictions).std(axis=0).max())
    label_spread = float(val_set.keypoints.std(axis=0).max())
    if spread >= COLLAPSED_SPREAD_PX or label_spread < 10 * COLLAPSED_SPREAD_PX:
        return None
    return (f"training collapsed: the network gives the same keypoints for all {len(val_set)} validation images "
            f"(spread {spread:.2g} px, labels {label_spread:.1f} px)")


def resume_path(checkpoint: Path | str) -> Path:
    """Where optimiser/scheduler/RNG state for resuming lives, beside the checkpoint."""
    return Path(checkpoint).with_suffix(".resume.pt")


def augment_batch(x: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random contrast/brightness per image (identity for a fraction of them)."""
    n = x.shape[0]
    a = torch.empty(n, 1, 1, 1).uniform_(*config.augment_contrast, generator=gen)
    b = torch.empty(n, 1, 1, 1).uniform_(*config.augment_brightness, generator=gen)
    keep = torch.rand(n, 1, 1, 1, generator=gen) >= config.augment_probability
    a = torch.where(keep, torch.ones_like(a), a)
    b = torch.where(keep, torch.zeros_like(b), b)
    return apply_photometric(x, a.to(x.device), b.to(x.device))


def geometric_batch(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn and scale each image (N, C, H, W) about its centre and move its normalised
    keypoints (N, 2K) with it (bilinear resampling, edge pixels repeated outward); images
    whose keypoints would leave the frame stay as they are. Identity, drawing nothing from
    ``gen``, when the config asks for no geometric augmentation."""
    if config.augment_flip_pairs is not None:
        x, y = _mirror_half(x, y, config.augment_flip_pairs, gen)
    if config.augment_rotation_deg == 0 and tuple(config.augment_scale) == (1.0, 1.0):
        return x, y
    n, _, h, w = x.shape
    angle = torch.empty(n, dtype=torch.float64).uniform_(-config.augment_rotation_deg,
                                                         config.augment_rotation_deg, generator=gen)
    scale = torch.empty(n, dtype=torch.float64).uniform_(*config.augment_scale, generator=gen)
    cos, sin = torch.cos(torch.deg2rad(angle)) * scale, torch.sin(torch.deg2rad(angle)) * scale
    # The turn is a rotation in pixels; normalised coordinates u = p / (W/2, H/2) see it as
    # S^-1 (s R) S with S = diag(W/2, H/2).
    forward = torch.stack([torch.stack([cos, -sin * h / w], 1), torch.stack([sin * w / h, cos], 1)], 1)
    points = y.reshape(n, -1, 2).to(torch.float64)
    moved = points @ forward.transpose(1, 2)
    inside = (moved.abs() <= 1.0 - 2.0 / min(h, w)).flatten(1).all(dim=1)  # a pixel's margin
    # grid_sample reads output location u at input location A u: A is the inverse map.
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, torch.zeros(n, 2, 1, dtype=torch.float64)], dim=2).to(x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    turned = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    keep = inside.view(n, 1, 1, 1)
    return (torch.where(keep, turned, x),
            torch.where(inside.view(n, 1), moved.reshape(n, -1).to(y.dtype), y))


def _mirror_half(x: torch.Tensor, y: torch.Tensor, pairs: tuple[tuple[int, int], ...], gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each image left-right with probability 1/2: its normalised keypoints' x
    changes sign (pixel-centre convention: x -> W - 1 - x) and each pair exchanges places."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    order = list(range(y.shape[1] // 2))
    for i, j in pairs:
        order[i], order[j] = j, i
    points = y.reshape(n, -1, 2)
    mirrored = (points * points.new_tensor([-1.0, 1.0]))[:, order].reshape(n, -1)
    return (torch.where(flip.view(n, 1, 1, 1), torch.flip(x, dims=(3,)), x),
            torch.where(flip.view(n, 1), mirrored, y))


def normalised_targets(dataset: KeypointDataset) -> torch.Tensor:
    """(N, 2K) float32 training targets in normalised coordinates."""
    h, w = dataset.image_hw
    norm = pixels_to_normalised(dataset.keypoints, h, w)
    return torch.from_numpy(norm.reshape(len(dataset), -1).astype(np.float32))


def train_epoch(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, config: TrainConfig,
                gen: torch.Generator, device: torch.device, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, bound: BoundLossConfig | None = None,
                bound_epoch: int = 0, extra_loss: Callable[[], torch.Tensor] | None = None,
                where: str = "epoch") -> float:
    """One pass over the training set in an order drawn from ``gen``: per batch, augmentation,
    the task loss plus ``extra_loss()`` and the bound loss of ``bound_epoch``, one optimiser
    and one scheduler step. The one epoch loop of training and of pruning's fine-tune;
    returns the mean loss. ``where`` names the epoch in the error a non-finite loss raises."""
    loss_fn = nn.SmoothL1Loss(beta=config.smooth_l1_beta)
    model.train()
    order = torch.randperm(len(images), generator=gen)
    total = 0.0
    for start in range(0, len(order), config.batch_size):
        idx = order[start:start + config.batch_size]
        x, y = geometric_batch(images[idx], targets[idx], config, gen)
        x = augment_batch(x, config, gen).to(device)
        loss = loss_fn(model(x), y.to(device))
        if extra_loss is not None:
            loss = loss + extra_loss()
        if bound is not None:
            loss = loss + bound.term(model, x, bound_epoch, gen)
        value = loss.item()
        check_finite_loss(value, f"{where}, batch {start // config.batch_size + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += value * len(idx)
    return total / len(order)


def _run_settings(model_config: ModelConfig, config: TrainConfig, train_set: KeypointDataset,
                  init: Path | str | None) -> dict[str, str]:
    """What a resumed run must share with the run it continues, each as text: the
    architecture, every training setting but the epoch count (checked on its own, with a
    hint) and the device, and digests of the training data and the starting weights."""
    import hashlib

    settings = {f"model.{k}": repr(v) for k, v in asdict(model_config).items()}
    settings.update({k: repr(v) for k, v in asdict(config).items() if k not in ("epochs", "device")})
    data = hashlib.sha256(np.ascontiguousarray(train_set.images).tobytes())
    data.update(np.ascontiguousarray(train_set.keypoints, dtype=np.float64).tobytes())
    data.update("\n".join(train_set.keypoint_names).encode())
    settings["training data"] = data.hexdigest()[:16]
    if init is not None:
        from usn_offline.runtime.hashing import sha256_file

        settings["init"] = sha256_file(init)[:16]
    return settings


def _check_same_run(out: Path, saved: object, settings: dict[str, str]) -> None:
    if saved is None:  # written before runs recorded their settings: nothing to compare
        log.warning("--resume: %s does not record its run's settings (an earlier version wrote it); they "
                    "are taken to be the same", resume_path(out))
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"{resume_path(out)}: cannot resume (its settings are not a table)")
    changed = [f"{k} {saved.get(k, 'unset')} -> {settings.get(k, 'unset')}"
               for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if changed:
        # Continuing with other data, another learning rate or loss would give a model that
        # neither run describes, under a checkpoint that names only the new settings.
        raise TrainingError(f"--resume: {out} was trained with other settings ({'; '.join(changed)}): resume "
                            "with the same ones, or train into a new --out")


def train_model(
    train_set: KeypointDataset,
    val_set: KeypointDataset,
    model_config: ModelConfig,
    config: TrainConfig,
    out: Path | str,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, float, float], None] | None = None,
    init: Path | str | None = None,
) -> TrainResult:
    """Train a keypoint network and write ``out`` (+ ``.json`` config, + ``.resume.pt``).

    With ``resume=True`` training continues from the state saved after the last
    completed epoch; the result equals an uninterrupted run with the same seed.
    ``init``: start from this checkpoint's weights (same architecture), e.g. to fine-tune
    a trained network with the bound loss — trained from scratch, the bound loss pulls
    the network to a constant output (zero width) before it learns the task.
    """
    out = Path(out)
    if train_set.image_hw != (model_config.input_height, model_config.input_width):
        raise ConfigError(f"dataset images are {train_set.image_hw}, model expects "
                          f"{(model_config.input_height, model_config.input_width)}")
    if train_set.num_keypoints != model_config.num_keypoints:
        raise ConfigError(f"dataset has {train_set.num_keypoints} keypoints, model expects "
                          f"{model_config.num_keypoints}")
    device = resolve_device(config.device)
    use_all_cpu_cores()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    model: KeypointNet = build_model(model_config).to(device)
    if init is not None:
        from usn_offline.train.checkpoint import load_checkpoint

        start, start_info = load_checkpoint(init)
        if start_info.model != model_config:
            raise ConfigError(f"--init {init}: its architecture differs from the one to train")
        model.load_state_dict(start.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(train_set) + config.batch_size - 1) // config.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15)
    start_epoch, history = 0, []
    settings = _run_settings(model_config, config, train_set, init)

    if resume and resume_path(out).is_file():
        try:
            state = torch.load(resume_path(out), map_location="cpu", weights_only=True)
            planned = int(state["scheduler"]["total_steps"]) // steps_per_epoch
            done = int(state["epoch"])
        except (KeyError, RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{resume_path(out)}: cannot resume ({first_line(exc)})") from exc
        if planned != config.epochs:
            # The learning-rate schedule was laid out for that many epochs; stretching it
            # midway would not be the run that was asked for.
            raise TrainingError(f"--resume: {out} comes from a run planned for {planned} epochs ({done} done), "
                                f"not {config.epochs}: resume with --epochs {planned}, or train into a new --out")
        _check_same_run(out, state.get("settings"), settings)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            start_epoch, history = done, list(state["history"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{resume_path(out)}: cannot resume ({first_line(exc)})") from exc
        log.info("resuming after epoch %d", start_epoch)

    images = torch.from_numpy(train_set.images).unsqueeze(1)
    targets = normalised_targets(train_set)
    info = CheckpointInfo(model=model_config,
                          preprocess=PreprocessConfig(model_config.input_height, model_config.input_width),
                          keypoint_names=train_set.keypoint_names)
    started = time.perf_counter()
    bar = tqdm(range(start_epoch, config.epochs), desc="train", unit="epoch", disable=not progress,
               initial=start_epoch, total=config.epochs)
    val_err = float("nan")
    for epoch in bar:
        history.append(train_epoch(model, images, targets, config, gen, device, optimizer, scheduler,
                                   bound=config.bound, bound_epoch=epoch, where=f"epoch {epoch + 1}"))
        val_pred = predict_pixels(model, val_set, device)
        val_err = evaluate_predictions(val_pred, val_set).mean_px_error
        bar.set_postfix(loss=f"{history[-1]:.4f}", val_px=f"{val_err:.2f}")
        log.info("epoch %d: loss %.5f, val mean px error %.3f", epoch + 1, history[-1], val_err)
        info.training = {"config": asdict(config), "epochs_done": epoch + 1, "loss_history": history,
                         "val_mean_px_error": val_err, "train_images": len(train_set)}
        save_checkpoint(out, model, info)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": gen.get_state(),
                    "epoch": epoch + 1, "history": history, "settings": settings}, resume_path(out))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history[-1], val_err)
    bar.close()
    if history and start_epoch < config.epochs:
        reason = collapse_message(val_pred, val_set)  # the last epoch's validation predictions
        if reason is not None:  # a constant-output checkpoint would only mislead what comes after it
            for path in (out, config_path(out), resume_path(out)):
                path.unlink(missing_ok=True)
            raise TrainingError(f"{reason}; no checkpoint written — try a lower --lr, more --epochs or "
                                "another --model")
    return TrainResult(checkpoint=out, epochs_run=config.epochs - start_epoch,
                       final_train_loss=history[-1] if history else float("nan"),
                       val_mean_px_error=val_err, loss_history=history,
                       seconds=time.perf_counter() - started)
