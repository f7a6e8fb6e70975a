"""Checkpoints: ``<name>.pt`` (a state dict, loaded with ``weights_only=True``) beside
``<name>.json`` (schema-versioned config: architecture, preprocessing, keypoint names,
training summary). Nothing is ever unpickled beyond tensors and plain containers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from usn_offline import __version__
from usn_offline.errors import CheckpointError, ConfigError, first_line
from usn_offline.jsonio import read_json_object
from usn_offline.models import KeypointNet, ModelConfig, build_model
from usn_offline.runtime.preprocess import PreprocessConfig

CHECKPOINT_SCHEMA_VERSION = 1


@dataclass
class CheckpointInfo:
    """The JSON half of a checkpoint."""

    model: ModelConfig
    preprocess: PreprocessConfig
    keypoint_names: tuple[str, ...]
    training: dict = field(default_factory=dict)
    schema_version: int = CHECKPOINT_SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "tool_version": __version__,
            "model": self.model.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "keypoint_names": list(self.keypoint_names),
            "training": self.training,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "checkpoint config") -> CheckpointInfo:
        version = data.get("schema_version")
        if type(version) is not int or version != CHECKPOINT_SCHEMA_VERSION:  # not true
            raise CheckpointError(
                f"{source}: unsupported schema_version {version!r} (expected {CHECKPOINT_SCHEMA_VERSION})")
        for key, kind in (("model", dict), ("preprocess", dict), ("keypoint_names", list)):
            if key in data and not isinstance(data[key], kind):
                raise CheckpointError(f"{source}: field '{key}' must be a JSON {'object' if kind is dict else 'list'}, "
                                      f"got {type(data[key]).__name__}")
        try:
            info = cls(
                model=ModelConfig.from_dict(data["model"]),
                preprocess=PreprocessConfig.from_dict(data["preprocess"]),
                keypoint_names=tuple(data["keypoint_names"]),
                training=dict(data.get("training", {})),
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing field {exc}") from exc
        except (TypeError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"{source}: invalid value ({exc})") from exc
        if len(info.keypoint_names) != info.model.num_keypoints:
            raise CheckpointError(f"{source}: {len(info.keypoint_names)} keypoint names for "
                                  f"{info.model.num_keypoints} keypoints")
        return info


def config_path(checkpoint: Path | str) -> Path:
    return Path(checkpoint).with_suffix(".json")


def save_checkpoint(path: Path | str, model: KeypointNet, info: CheckpointInfo) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # Write-then-rename so an interrupted save never leaves a truncated checkpoint.
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    config_path(path).write_text(json.dumps(info.to_dict(), indent=2))
    return path


def load_checkpoint_info(path: Path | str) -> CheckpointInfo:
    cfg = config_path(path)
    if not cfg.is_file():
        raise CheckpointError(f"checkpoint config not found: {cfg} (expected beside {Path(path).name})")
    data = read_json_object(cfg, CheckpointError)
    return CheckpointInfo.from_dict(data, source=str(cfg))


def load_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt/unsafe files
        raise CheckpointError(f"{path}: cannot read checkpoint ({first_line(exc)})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:  # every result from it would be NaN, and be written as if it were one
        raise CheckpointError(f"{path}: weights {broken} hold NaN or infinite values")
    return state


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[KeypointNet, CheckpointInfo]:
    """Rebuild the network from the JSON config and load its weights (eval mode)."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    info = load_checkpoint_info(path)
    state = load_state_dict(path)
    # The architecture is checked against the weights on the meta device first (shapes
    # only, no memory): a config declaring huge widths must not allocate them.
    with torch.device("meta"):
        skeleton = build_model(info.model)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise CheckpointError(f"{path}: weights do not match the architecture in {config_path(path).name} "
                              f"(first difference: {wrong[0]}: config {expected.get(wrong[0])}, "
                              f"weights {found.get(wrong[0])})")
    model = build_model(info.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the architecture in "
                              f"{config_path(path).name} ({first_line(exc)})") from exc
    return model.to(device).eval(), info
