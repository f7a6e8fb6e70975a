"""Device selection: ``auto`` picks CUDA when present, the CPU otherwise."""

from __future__ import annotations

import torch

from usn_offline.errors import ConfigError
from usn_offline.resources import usable_cores


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device '{spec}' (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' requested but CUDA is not available on this machine")
    return device


def use_all_cpu_cores() -> None:
    """Let intra-op parallelism use every core this process may run on."""
    torch.set_num_threads(usable_cores())
