"""The geometric augmentation a dataset declares its target allows.

A COCO category may carry, beside its ``keypoints`` and ``skeleton``, an
``augmentation`` object (our extension; other COCO tools ignore it)::

    "augmentation": {"rotation_deg": 30, "scale": [0.85, 1.0],
                     "flip_pairs": [["vertex_1", "vertex_5"], ["vertex_2", "vertex_4"]]}

``rotation_deg``: training images may be turned by up to +-this many degrees;
``scale``: scaled by a factor in [lo, hi]; ``flip_pairs``: a horizontally mirrored image
shows the same target with these keypoints exchanged (present, even empty: mirroring is
allowed; absent: it is not — e.g. a target whose mirror image no real view shows).
``usn-offline train`` uses the declaration unless its own options say otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from usn_offline.errors import DatasetError


@dataclass(frozen=True)
class GeometricAugmentation:
    """Geometric augmentation a target allows (identity by default)."""

    rotation_deg: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    flip_pairs: tuple[tuple[int, int], ...] | None = None  # keypoint indices; None: no mirroring

    def describe(self) -> str:
        parts = []
        if self.rotation_deg:
            parts.append(f"rotation up to +-{self.rotation_deg:g} deg")
        if tuple(self.scale) != (1.0, 1.0):
            parts.append(f"scale {self.scale[0]:g}-{self.scale[1]:g}")
        if self.flip_pairs is not None:
            parts.append(f"horizontal mirroring ({len(self.flip_pairs)} keypoint pair(s) exchanged)")
        return ", ".join(parts) or "none"


def parse_augmentation(value: object, names: tuple[str, ...], where: str) -> GeometricAugmentation:
    """The category's ``augmentation`` object, checked against its keypoint ``names``;
    errors name ``where`` (the annotation file)."""
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: category 'augmentation' must be an object, got {type(value).__name__}")
    unknown = set(value) - {"rotation_deg", "scale", "flip_pairs"}
    if unknown:
        raise DatasetError(f"{where}: unknown category 'augmentation' field(s) {sorted(unknown)} "
                           "(known: rotation_deg, scale, flip_pairs)")
    rotation = value.get("rotation_deg", 0.0)
    if not _number(rotation) or not 0.0 <= rotation <= 180.0:
        raise DatasetError(f"{where}: augmentation rotation_deg must be a number in [0, 180], got {rotation!r}")
    scale = value.get("scale", [1.0, 1.0])
    if (not isinstance(scale, list) or len(scale) != 2 or not all(_number(s) for s in scale)
            or not 0.0 < scale[0] <= scale[1]):
        raise DatasetError(f"{where}: augmentation scale must be [lo, hi] with 0 < lo <= hi, got {scale!r}")
    pairs = None
    if "flip_pairs" in value:
        raw = value["flip_pairs"]
        if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 for p in raw):
            raise DatasetError(f"{where}: augmentation flip_pairs must be a list of [name, name] pairs")
        index = {name: i for i, name in enumerate(names)}
        seen: set[int] = set()
        pairs = []
        for first, second in raw:
            if first not in index or second not in index or first == second:
                raise DatasetError(f"{where}: augmentation flip pair [{first!r}, {second!r}] must name two "
                                   f"different keypoints of {list(names)}")
            pair = (index[first], index[second])
            if seen & set(pair):
                raise DatasetError(f"{where}: augmentation flip_pairs name keypoint(s) twice")
            seen |= set(pair)
            pairs.append(pair)
        pairs = tuple(pairs)
    return GeometricAugmentation(float(rotation), (float(scale[0]), float(scale[1])), pairs)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
