"""Render one synthetic training image: a target under a random homography over a photo.

Ground truth is exact: the keypoints are the target's texture keypoints mapped through the
same homography that warps the texture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from usn_offline.data.target import TARGETS, TargetTexture
from usn_offline.errors import ConfigError


@dataclass(frozen=True)
class RenderConfig:
    """Ranges of the random scene parameters (sizes are fractions of the image width)."""

    image_size: int = 64
    texture_size: int = 96
    supersample: int = 4
    scale_range: tuple[float, float] = (0.35, 0.7)  # pad side length / image size
    max_rotation_deg: float = 40.0
    perspective: float = 0.12  # max corner displacement / pad side
    margin_px: float = 2.0  # keypoints stay at least this far inside the image
    blur_probability: float = 0.5
    blur_sigma_range: tuple[float, float] = (0.4, 1.6)
    noise_sigma_range: tuple[float, float] = (0.0, 0.03)
    pad_dark_range: tuple[float, float] = (0.03, 0.35)
    pad_light_range: tuple[float, float] = (0.6, 0.97)
    illumination_gradient: float = 0.25
    target: str = "landing_pad"  # a name of data/target.py TARGETS

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target '{self.target}' (choose from {sorted(TARGETS)})")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"scale_range must satisfy 0 < lo <= hi <= 1, got {self.scale_range}")
        if self.supersample < 1:
            raise ConfigError(f"supersample must be >= 1, got {self.supersample}")

    def to_dict(self) -> dict:
        return asdict(self)


def sample_homography(rng: np.random.Generator, texture: TargetTexture, config: RenderConfig) -> np.ndarray:
    """A random texture->image homography keeping the texture square (so every keypoint)
    inside the image margin."""
    n = config.image_size
    lo, hi = config.margin_px - 0.5, n - 0.5 - config.margin_px
    src = texture.corners.astype(np.float32)
    for _ in range(1000):
        side = rng.uniform(*config.scale_range) * n
        theta = np.deg2rad(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
        centre = rng.uniform(lo + side / 2, hi - side / 2, size=2) if hi - lo > side else np.full(2, (n - 1) / 2)
        unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        corners = centre + side * unit @ rot.T
        corners += rng.uniform(-1, 1, size=(4, 2)) * config.perspective * side
        if corners.min() >= lo and corners.max() <= hi:
            return cv2.getPerspectiveTransform(src, corners.astype(np.float32)).astype(np.float64)
    raise ConfigError("could not place the target inside the image; widen scale_range or shrink margin_px")


def project(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 homography to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64)
    hom = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ homography.T
    return hom[:, :2] / hom[:, 2:3]


def _supersampled(homography: np.ndarray, factor: int) -> np.ndarray:
    # Low-res pixel x maps to high-res x_hi = factor * x + (factor - 1) / 2 (pixel centres).
    up = np.array([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2], [0, 0, 1]])
    return up @ homography


def warp_texture(texture: np.ndarray, homography: np.ndarray, image_size: int, supersample: int,
                 mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Warp a texture into an image_size x image_size frame, anti-aliased by supersampling.

    Returns (warped texture, coverage alpha in [0, 1]); both float32. ``mask``: where the
    target is in the texture (default: all of it).
    """
    coverage = np.ones_like(texture, dtype=np.float32) if mask is None else mask.astype(np.float32)
    hi_h = _supersampled(homography, supersample)
    size_hi = (image_size * supersample, image_size * supersample)
    warped, alpha = (
        cv2.warpPerspective(t, hi_h, size_hi, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        for t in (texture.astype(np.float32), coverage))
    size = (image_size, image_size)
    return (cv2.resize(warped, size, interpolation=cv2.INTER_AREA),
            cv2.resize(alpha, size, interpolation=cv2.INTER_AREA))


def _background(rng: np.random.Generator, photos: tuple[np.ndarray, ...], n: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape
    crop = int(rng.uniform(0.25, 1.0) * min(h, w))
    y0, x0 = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    patch = photo[y0:y0 + crop, x0:x0 + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = cv2.resize(np.ascontiguousarray(patch), (n, n), interpolation=cv2.INTER_AREA)
    return patch * rng.uniform(0.6, 1.1) + rng.uniform(-0.1, 0.15)


def render_scene(
    rng: np.random.Generator,
    photos: tuple[np.ndarray, ...],
    config: RenderConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image. Returns (uint8 image (N, N), keypoints (K, 2) in pixels)."""
    n = config.image_size
    texture = TARGETS[config.target].draw(config.texture_size, rng.uniform(*config.pad_dark_range),
                                          rng.uniform(*config.pad_light_range))
    homography = sample_homography(rng, texture, config)
    keypoints = project(homography, texture.keypoints)

    pad, alpha = warp_texture(texture.image, homography, n, config.supersample, texture.mask)
    image = alpha * pad + (1.0 - alpha) * _background(rng, photos, n)

    # Smooth illumination change across the scene (a sun patch, a shadow edge).
    gx, gy = rng.uniform(-1, 1, size=2) * config.illumination_gradient
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1) - 0.5
    image = image * (1.0 + gx * xx + gy * yy)

    if rng.random() < config.blur_probability:
        sigma = rng.uniform(*config.blur_sigma_range)
        blurred = cv2.GaussianBlur(image, (0, 0), sigma)
        # Partial blur: defocus that fades in across a random direction.
        direction = rng.normal(size=2)
        ramp = (xx * direction[0] + yy * direction[1]) / (np.linalg.norm(direction) + 1e-9)
        weight = np.clip(0.5 + 2.0 * ramp + rng.uniform(-0.5, 0.5), 0.0, 1.0)
        image = weight * blurred + (1.0 - weight) * image

    image = image + rng.normal(0.0, rng.uniform(*config.noise_sigma_range), size=image.shape)
    image8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return image8, keypoints
