"""Real photographs used as backgrounds: the ones scikit-image ships inside its wheel."""

from __future__ import annotations

from functools import cache

import numpy as np
import skimage.data

from usn_offline.errors import DatasetError
from usn_offline.runtime.preprocess import to_gray_float

# Real photographs (no synthetic test patterns) that load without a download.
BACKGROUND_NAMES: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cat", "coffee", "coins", "grass", "gravel", "moon",
    "page", "rocket", "text", "hubble_deep_field", "immunohistochemistry", "retina", "clock",
    "cell", "stereo_motorcycle",
)


def _load_one(name: str) -> np.ndarray:
    try:
        image = getattr(skimage.data, name)()
    except Exception as exc:  # pooch/network or a renamed loader: say which photo failed
        raise DatasetError(f"cannot load scikit-image background photo '{name}': {exc}") from exc
    if isinstance(image, tuple):  # stereo pairs: use the left view
        image = image[0]
    return to_gray_float(np.asarray(image))


@cache
def load_backgrounds(names: tuple[str, ...] = BACKGROUND_NAMES) -> tuple[np.ndarray, ...]:
    """Grayscale float32 photos in [0, 1] (cached: loading them takes ~0.5 s)."""
    return tuple(_load_one(n) for n in names)
