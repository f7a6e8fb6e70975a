"""Camera-size nominal frames: a dataset image (the target with its keypoints) placed in a
larger frame over a background photo, at a pose that drifts when the camera moves.

The target image is stretched to the frame's aspect ratio, so that the node's resize of
the whole frame to the (square) network input shows it about as the dataset did, framed
by a little background. Keypoints follow exactly: they go through the same affine map as
the pixels (pixel-centre convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from usn_offline.errors import ConfigError


@dataclass(frozen=True)
class ViewLayout:
    """One view of a scenario: which target image and background, and where they sit."""

    image_index: int  # into the dataset
    background_index: int  # into the background photos
    crop_centre: tuple[float, float]  # background crop centre, fractions of the photo
    crop_size: float  # background crop height, fraction of the largest crop that fits
    cover: float  # target size, fraction of the frame (both axes)
    centre: tuple[float, float]  # target centre, fractions of the frame
    drift: tuple[float, float, float]  # camera motion amplitude: x, y (fractions of the frame), scale

    @classmethod
    def sample(cls, rng: np.random.Generator, num_images: int, num_backgrounds: int, moving: bool) -> ViewLayout:
        return cls(image_index=int(rng.integers(num_images)), background_index=int(rng.integers(num_backgrounds)),
                   crop_centre=(float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))),
                   crop_size=float(rng.uniform(0.5, 0.9)), cover=float(rng.uniform(0.86, 0.94)),
                   centre=(float(rng.uniform(0.47, 0.53)), float(rng.uniform(0.47, 0.53))),
                   drift=(float(rng.uniform(0.02, 0.04)), float(rng.uniform(0.02, 0.04)),
                          float(rng.uniform(0.03, 0.05))) if moving else (0.0, 0.0, 0.0))


def _affine(scale_x: float, scale_y: float, left: float, top: float) -> np.ndarray:
    """Source pixel (x, y) -> frame pixel for a source whose edge (-0.5, -0.5) lands on frame
    edge coordinates (left, top) (0 = the frame's left edge) at the given scales."""
    return np.array([[scale_x, 0.0, scale_x * 0.5 + left - 0.5],
                     [0.0, scale_y, scale_y * 0.5 + top - 0.5]])


def render_view(layout: ViewLayout, motion: float, target: np.ndarray, target_keypoints: np.ndarray,
                background: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(nominal frame (height, width) float32 in [0, 1], keypoints (K, 2) in frame pixels).

    ``target`` is a grayscale float image in [0, 1] with ``target_keypoints`` in its pixels;
    ``motion`` in [0, 1) is the camera's phase along its path (0 for a static camera).
    """
    if width < 16 or height < 16:
        raise ConfigError(f"frames must be at least 16x16 pixels, got {width}x{height}")
    swing = math.sin(2 * math.pi * motion)
    sway = math.sin(4 * math.pi * motion + 0.7)

    # Background: a crop of the photo with the frame's aspect ratio, panning with the camera.
    ph, pw = background.shape
    crop_h = layout.crop_size * min(ph, pw * height / width)
    crop_w = crop_h * width / height
    cx = np.clip(layout.crop_centre[0] * pw + 0.15 * crop_w * swing, crop_w / 2, pw - crop_w / 2)
    cy = np.clip(layout.crop_centre[1] * ph + 0.15 * crop_h * sway, crop_h / 2, ph - crop_h / 2)
    s = height / crop_h
    frame = cv2.warpAffine(background.astype(np.float32), _affine(s, s, -(cx - crop_w / 2) * s, -(cy - crop_h / 2) * s),
                           (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    # Target: stretched to the frame's aspect, drifting and zooming a little with the camera.
    th, tw = target.shape
    cover = min(0.98, layout.cover * (1.0 + layout.drift[2] * sway))
    rect_w, rect_h = cover * width, cover * height
    centre_x = np.clip((layout.centre[0] + layout.drift[0] * swing) * width, rect_w / 2, width - rect_w / 2)
    centre_y = np.clip((layout.centre[1] + layout.drift[1] * sway) * height, rect_h / 2, height - rect_h / 2)
    sx, sy = rect_w / tw, rect_h / th
    matrix = _affine(sx, sy, centre_x - rect_w / 2, centre_y - rect_h / 2)
    warped = cv2.warpAffine(target.astype(np.float32), matrix, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    alpha = cv2.warpAffine(np.ones_like(target, dtype=np.float32), matrix, (width, height),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    frame = warped + (1.0 - alpha) * frame  # warped is already weighted by alpha (zero border)
    keypoints = np.asarray(target_keypoints, np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return np.clip(frame, 0.0, 1.0), keypoints


def relight(nominal: np.ndarray, contrast: float, brightness: float) -> np.ndarray:
    """The camera frame under other light: round(255 clip(a x + b, 0, 1)) of a uint8 frame."""
    x = nominal.astype(np.float64) / 255.0
    return np.rint(255.0 * np.clip(contrast * x + brightness, 0.0, 1.0)).astype(np.uint8)
