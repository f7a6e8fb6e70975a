"""The built-in planar targets, drawn as textures whose keypoints are known exactly.

``landing_pad``: a dark square with a light border ring, a light "H" and a light disc next
to corner 0; its four outer corners are the keypoints (TL, TR, BR, BL in the pad's frame).
``docking_hexagon``: a light hexagonal plate with a dark inner hexagon, a light ring round
its centre and a light disc towards vertex 0; its six vertices and its centre are the
keypoints, and it is rendered under any in-plane rotation. Each target's orientation mark
keeps the keypoint order defined however it is turned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

KEYPOINT_NAMES: tuple[str, ...] = ("top_left", "top_right", "bottom_right", "bottom_left")
# Edges of the pad outline, as COCO "skeleton" (1-based keypoint indices).
SKELETON: tuple[tuple[int, int], ...] = ((1, 2), (2, 3), (3, 4), (4, 1))


@dataclass(frozen=True)
class TargetTexture:
    """A target's texture (float32 in [0, 1], square), its keypoints in texture pixels and,
    for a target that does not fill the square, its coverage ``mask`` (1 on the target)."""

    image: np.ndarray
    keypoints: np.ndarray  # (K, 2), pixel-centre convention
    mask: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.image.shape[0]

    @property
    def corners(self) -> np.ndarray:
        """(4, 2) the texture square's outer corners (TL, TR, BR, BL): what is placed in the image."""
        e = self.size - 0.5
        return np.array([[-0.5, -0.5], [e, -0.5], [e, e], [-0.5, e]], dtype=np.float64)


def make_pad_texture(size: int = 96, dark: float = 0.15, light: float = 0.9) -> TargetTexture:
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
    return TargetTexture(image=img, keypoints=keypoints)


HEXAGON_KEYPOINT_NAMES: tuple[str, ...] = ("vertex_0", "vertex_1", "vertex_2", "vertex_3", "vertex_4", "vertex_5",
                                           "centre")
HEXAGON_SKELETON: tuple[tuple[int, int], ...] = ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 1))


def _hexagon(centre: float, radius: float) -> np.ndarray:
    """(6, 2) vertices, vertex 0 straight up, then clockwise (image y points down)."""
    angles = np.deg2rad(-90.0 + 60.0 * np.arange(6))
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


# The hexagon is drawn this many times finer and averaged down, so that its edges are
# anti-aliased and its coverage matches the ideal polygon the keypoints are vertices of.
_FINE = 8


def _fine(points: np.ndarray) -> np.ndarray:
    """Pixel-centre texture coordinates -> those of the fine grid, as cv2 fixed point (4 bits)."""
    return np.rint((np.asarray(points) * _FINE + (_FINE - 1) / 2) * 16).astype(np.int32)


def make_hexagon_texture(size: int = 96, dark: float = 0.15, light: float = 0.9) -> TargetTexture:
    """Draw the docking hexagon at ``size`` x ``size`` texture pixels: its vertices touch
    the square's top and bottom edges (where the keypoints are)."""
    c, r = (size - 1) / 2.0, size / 2.0
    outer = _hexagon(c, r)
    fine = (size * _FINE, size * _FINE)
    mask = np.zeros(fine, dtype=np.float32)
    cv2.fillPoly(mask, [_fine(outer)], 1.0, lineType=cv2.LINE_8, shift=4)
    img = np.full(fine, light, dtype=np.float32)
    cv2.fillPoly(img, [_fine(_hexagon(c, 0.8 * r))], float(dark), lineType=cv2.LINE_8, shift=4)
    centre, mark = _fine([[c, c]])[0], _fine([[c, c - 0.55 * r]])[0]
    cv2.circle(img, tuple(int(v) for v in centre), int(0.28 * r * _FINE * 16), float(light),
               thickness=max(2, size // 24) * _FINE, lineType=cv2.LINE_8, shift=4)
    cv2.circle(img, tuple(int(v) for v in mark), int(0.12 * r * _FINE * 16), float(light), thickness=-1,
               lineType=cv2.LINE_8, shift=4)
    down = (size, size)
    keypoints = np.concatenate([outer, [[c, c]]]).astype(np.float64)
    return TargetTexture(image=cv2.resize(img, down, interpolation=cv2.INTER_AREA), keypoints=keypoints,
                         mask=cv2.resize(mask, down, interpolation=cv2.INTER_AREA))


@dataclass(frozen=True)
class Target:
    """A built-in target: its keypoints' names and skeleton, how it is drawn, the in-plane
    rotation range its generator uses by default, and the geometric augmentation its
    datasets declare (:mod:`usn_offline.data.augmentation`; None: none)."""

    name: str
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]
    draw: Callable[[int, float, float], TargetTexture]
    max_rotation_deg: float
    augmentation: dict | None = None


# The hexagon is symmetric about the axis through vertex 0, its mark and the centre: a
# mirrored view shows it with vertices 1/5 and 2/4 exchanged. The landing pad's mirror
# image (a transposed "H") is no view of the pad, so it declares nothing (and the demo's
# training stays as measured).
HEXAGON_AUGMENTATION = {"rotation_deg": 30.0, "scale": [0.85, 1.0],
                        "flip_pairs": [["vertex_1", "vertex_5"], ["vertex_2", "vertex_4"]]}

TARGETS: dict[str, Target] = {
    "landing_pad": Target("landing_pad", KEYPOINT_NAMES, SKELETON, make_pad_texture, 40.0),
    "docking_hexagon": Target("docking_hexagon", HEXAGON_KEYPOINT_NAMES, HEXAGON_SKELETON, make_hexagon_texture,
                              180.0, HEXAGON_AUGMENTATION),
}
