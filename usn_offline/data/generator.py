"""Generate the built-in dataset: rendered landing-pad scenes written as COCO folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from usn_offline.data.backgrounds import load_backgrounds
from usn_offline.data.coco import write_split
from usn_offline.data.render import RenderConfig, render_scene
from usn_offline.data.target import TARGETS
from usn_offline.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class GeneratorConfig:
    """Split sizes, seed and scene ranges of the built-in dataset."""

    num_train: int = 8000
    num_val: int = 500
    num_test: int = 1000
    seed: int = 0
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


def render_split(config: GeneratorConfig, split: str, progress: bool = True
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """Render a split. Image i of a split depends only on (seed, split, i)."""
    photos = load_backgrounds()
    split_id = SPLITS.index(split)
    n = config.split_sizes()[split]
    images, keypoints = [], []
    for i in tqdm(range(n), desc=f"render {split}", unit="img", disable=not progress, leave=False):
        rng = np.random.default_rng([config.seed, split_id, i])
        image, kps = render_scene(rng, photos, config.render)
        images.append(image)
        keypoints.append(kps)
    return images, np.stack(keypoints)


def generate_dataset(root: Path | str, config: GeneratorConfig, progress: bool = True) -> dict[str, Path]:
    """Render all splits into ``root`` (COCO keypoints layout); returns annotation paths."""
    root = Path(root)
    info = {"generator": "usn_offline.data.generator", "seed": config.seed,
            "render_config": config.render.to_dict()}
    out = {}
    for split in SPLITS:
        images, keypoints = render_split(config, split, progress)
        target = TARGETS[config.render.target]
        out[split] = write_split(root, split, images, keypoints, target.keypoint_names, target.skeleton, info,
                                 target.augmentation)
    return out
