"""Model configuration: everything needed to rebuild a network from its JSON sidecar."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from usn_offline.errors import ConfigError

INPUT_NORMS = ("none", "standardise")
# Keeps a flat image finite; small against the variance of any image with structure
# (one 8-bit level is 4e-3), so the invariance holds to ~1e-6 relative.
STANDARDISE_EPS = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a keypoint network.

    ``family`` picks the backbone (see :data:`usn_offline.models.registry.BACKBONES`),
    ``head`` the output head; ``widths`` are the backbone's channel counts and
    ``hidden`` the width of the head's hidden linear layer. ``input_norm``: "none", or
    "standardise" — the network first maps its input x to (x - mean(x)) / sqrt(var(x) + eps)
    over the image, which makes it exactly invariant to every contrast/brightness change
    a x + b (a > 0) that clips no pixel (docs/METHOD.md, "Input standardisation").
    """

    family: str = "cnn7"
    num_keypoints: int = 4
    input_height: int = 64
    input_width: int = 64
    in_channels: int = 1
    widths: tuple[int, ...] = (16, 32, 32, 64, 64)
    hidden: int = 256
    head: str = "regression"
    input_norm: str = "none"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_keypoints < 1:
            raise ConfigError(f"num_keypoints must be >= 1, got {self.num_keypoints}")
        if min(self.input_height, self.input_width) < 16:
            raise ConfigError(f"input size must be >= 16x16, got {self.input_height}x{self.input_width}")
        if not self.widths or min(self.widths) < 1:
            raise ConfigError(f"widths must be positive, got {self.widths}")
        if self.input_norm not in INPUT_NORMS:
            raise ConfigError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.input_norm == "standardise" and self.in_channels != 1:
            raise ConfigError("input standardisation needs a one-channel (grayscale) input")
        if self.hidden < 1:
            raise ConfigError(f"hidden must be >= 1, got {self.hidden}")

    @property
    def num_outputs(self) -> int:
        return 2 * self.num_keypoints

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "widths" in known:
            known["widths"] = tuple(int(w) for w in known["widths"])
        return cls(**known)
