"""In-memory keypoint dataset: preprocessed images plus pixel keypoints."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from usn_offline.data.augmentation import GeometricAugmentation


@dataclass
class KeypointDataset:
    """Images (N, H, W) float32 in [0, 1], already at the network input size, and
    keypoints (N, K, 2) in pixel coordinates of those images. ``source_hw`` (N, 2): the
    (height, width) each image is stored at, where known — errors in the user's own image
    pixels are measured with it."""

    images: np.ndarray
    keypoints: np.ndarray
    keypoint_names: tuple[str, ...]
    file_names: tuple[str, ...]
    split: str
    source_hw: np.ndarray | None = None
    augmentation: GeometricAugmentation = field(default_factory=GeometricAugmentation)

    def __post_init__(self) -> None:
        if self.images.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got {self.images.shape}")
        n, k = len(self.images), len(self.keypoint_names)
        if self.keypoints.shape != (n, k, 2):
            raise ValueError(f"keypoints must be ({n}, {k}, 2), got {self.keypoints.shape}")
        if len(self.file_names) != n:
            raise ValueError(f"{len(self.file_names)} file names for {n} images")
        if self.source_hw is not None and np.shape(self.source_hw) != (n, 2):
            raise ValueError(f"source_hw must be ({n}, 2), got {np.shape(self.source_hw)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: np.ndarray | list[int] | slice) -> KeypointDataset:
        idx = np.arange(len(self))[indices]
        return KeypointDataset(
            images=self.images[idx],
            keypoints=self.keypoints[idx],
            keypoint_names=self.keypoint_names,
            file_names=tuple(self.file_names[i] for i in idx),
            split=self.split,
            source_hw=None if self.source_hw is None else self.source_hw[idx],
            augmentation=self.augmentation,
        )
