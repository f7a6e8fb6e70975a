"""The planar target: a landing pad whose four outer corners are the keypoints.

The pad is a dark square with a light border ring, a light "H" and a light disc next to
corner 0, so that the corner order (TL, TR, BR, BL in the pad's frame) stays defined
under any in-plane rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

KEYPOINT_NAMES: tuple[str, ...] = ("top_left", "top_right", "bottom_right", "bottom_left")
# Edges of the pad outline, as COCO "skeleton" (1-based keypoint indices).
SKELETON: tuple[tuple[int, int], ...] = ((1, 2), (2, 3), (3, 4), (4, 1))


@dataclass(frozen=True)
class PadTexture:
    """A rendered pad texture (float32 in [0, 1]) and its keypoints in texture pixels."""

    image: np.ndarray
    keypoints: np.ndarray  # (4, 2), pixel-centre convention

    @property
    def size(self) -> int:
        return self.image.shape[0]


def make_pad_texture(size: int = 96, dark: float = 0.15, light: float = 0.9) -> PadTexture:
    """Draw the landing pad at ``size`` x ``size`` texture pixels."""
    img = np.full((size, size), light, dtype=np.float32)
    ring = max(2, size // 12)
    img[ring:size - ring, ring:size - ring] = dark
    # "H": two vertical bars and a cross bar, centred.
    c = size / 2.0
    bar_w, bar_h, gap = size * 0.09, size * 0.46, size * 0.17
    for x0 in (c - gap - bar_w, c + gap):
        cv2.rectangle(img, (int(x0), int(c - bar_h / 2)), (int(x0 + bar_w), int(c + bar_h / 2)),
                      float(light), thickness=-1)
    cv2.rectangle(img, (int(c - gap), int(c - bar_w / 2)), (int(c + gap), int(c + bar_w / 2)),
                  float(light), thickness=-1)
    # Orientation disc near corner 0 (top-left).
    r = size * 0.08
    cv2.circle(img, (int(ring + 1.6 * r), int(ring + 1.6 * r)), int(r), float(light), thickness=-1)
    e = size - 0.5
    keypoints = np.array([[-0.5, -0.5], [e, -0.5], [e, e], [-0.5, e]], dtype=np.float64)
    return PadTexture(image=img, keypoints=keypoints)
