"""Image preprocessing and keypoint coordinate conventions (torch-free).

One implementation, used by dataset loading, training, evaluation and the node,
so the network always sees images prepared exactly the same way.

Conventions:
- Pixel coordinates: (x, y) with the centre of pixel (col, row) at (col, row), i.e.
  the image spans [-0.5, W-0.5] x [-0.5, H-0.5] (OpenCV convention).
- Normalised coordinates: u = 2 (x + 0.5) / W - 1, so the image spans [-1, 1].
  The network regresses normalised coordinates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PreprocessConfig:
    """How a camera image becomes a network input of shape (1, height, width) in [0, 1]."""

    input_height: int = 64
    input_width: int = 64
    grayscale: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        """Read a manifest's or checkpoint's preprocessing; its types are checked, not
        coerced (a side of 64.9 or a grayscale of "false" is not what it seems to say)."""
        sides = {key: data[key] for key in ("input_height", "input_width")}
        for key, value in sides.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        # Every network here reads one grey channel; a bundle that says otherwise would be
        # served frames other than the ones it was certified on.
        if data.get("grayscale", True) is not True:
            raise ValueError(f"grayscale must be true (networks read one grey channel), got "
                             f"{data.get('grayscale')!r}")
        return cls(input_height=sides["input_height"], input_width=sides["input_width"], grayscale=True)


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Convert an HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) uint8/uint16/float image to
    float32 grayscale in [0, 1]."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] not in (3, 4):
        raise ValueError(f"unsupported channel count {image.shape[2]}")
    if image.ndim not in (2, 3):
        raise ValueError(f"unsupported image shape {image.shape}")
    return np.clip(_luma(image), 0.0, 1.0)


def area_averaged(height: int, width: int, config: PreprocessConfig) -> bool:
    """Whether a frame of this size reaches the network input by area averaging (or as it
    is): then every frame pixel weighs the same in the input's mean."""
    return height >= config.input_height and width >= config.input_width


def resize_image(gray: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Resize a float grayscale image to the network input size (area interpolation)."""
    h, w = gray.shape
    if (h, w) == (config.input_height, config.input_width):
        return gray
    interp = cv2.INTER_AREA if area_averaged(h, w, config) else cv2.INTER_LINEAR
    return cv2.resize(gray, (config.input_width, config.input_height), interpolation=interp)


# ITU-R BT.601 luma, as cv2.cvtColor(RGB2GRAY); alpha does not count.
_LUMA = {3: (0.299, 0.587, 0.114), 4: (0.299, 0.587, 0.114, 0.0)}


def full_scale(dtype: np.dtype) -> float:
    """The pixel value that means 1.0 (full light) for a frame's pixel type."""
    return 255.0 if dtype == np.uint8 else 65535.0 if dtype == np.uint16 else 1.0


def _luma(image: np.ndarray) -> np.ndarray:
    """float32 (H, W) of a mono or RGB(A) uint8/uint16/float frame, scaled to [0, 1].

    OpenCV's per-pixel transform, not a numpy matrix product: BLAS threads on such a thin
    product cost 8 ms instead of 0.5 per 640x480 frame on a busy 2-core machine (measured)."""
    scale = 1.0 / full_scale(image.dtype)
    pixels = image.astype(np.float32)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return pixels * np.float32(scale) if scale != 1.0 else pixels
    weights = np.array([_LUMA[pixels.shape[2]]], np.float64) * scale
    return cv2.transform(pixels, weights.astype(np.float32))


@functools.cache
def _sum_luma_matrix(channels: int, scale: float) -> np.ndarray:
    """cv2.transform matrix (1, channels) float32: the luma of per-channel sums (alpha
    weighs 0), times ``scale`` (full scale and the number of pixels summed)."""
    return (np.array([_LUMA[channels]], np.float64) * scale).astype(np.float32)


def _vertical_area_sums(rows: np.ndarray, out_h: int) -> tuple[np.ndarray, int]:
    """Area-resize the rows of an integer (h, n) array to ``out_h`` rows, h >= out_h, as
    exact integer sums: returns (sums float32 (out_h, n), divisor) with the area average
    equal to sums / divisor.

    Over a period of p = h/g input rows and q = out_h/g output rows (g = gcd), output j
    covers rows [j p/q, (j+1) p/q): whole rows with weight q and at most two split rows
    with an integer weight in (0, q), so the sums are exact integers and the divisor is p.
    Every step writes into one buffer of the sums' size: temporaries of a frame's size
    would cost more in page faults than the arithmetic (measured 0.3 ms at 640x480 rgb8)."""
    h, n = rows.shape
    g = math.gcd(h, out_h)
    p, q = h // g, out_h // g
    periods = rows.reshape(g, p, n)
    # In the narrowest integer type that holds the sums exactly (the frame is read once,
    # in wide vector adds); float32 only at the end.
    largest = q * p * int(np.iinfo(rows.dtype).max)
    accumulator = np.uint16 if largest <= 0xFFFF else np.uint32 if largest <= 0xFFFFFFFF else np.uint64
    sums = np.empty((g, q, n), accumulator)
    split = np.empty((g, n), accumulator) if q > 2 else None
    for j in range(q):
        lo, hi = j * p, (j + 1) * p  # in units of 1/q row
        first, end = -(-lo // q), hi // q  # the whole rows
        out = sums[:, j]
        np.sum(periods[:, first:end], axis=1, dtype=accumulator, out=out)
        if q > 1:
            np.multiply(out, q, out=out)
        for row, weight in ((lo // q, q * (lo // q + 1) - lo), (hi // q, hi - q * (hi // q))):
            if 0 < weight < q:
                if weight == 1:
                    np.add(out, periods[:, row], out=out)
                else:
                    np.add(out, np.multiply(periods[:, row], weight, out=split, dtype=accumulator), out=out)
    return sums.reshape(out_h, n).astype(np.float32), p


def _area_gray_integer(image: np.ndarray, config: PreprocessConfig) -> np.ndarray | None:
    """Fast path of :func:`preprocess` for 8/16-bit frames at least as large as the input:
    area averaging is linear and separable, so the vertical step runs first, on the integer
    pixels (exact sums of whole rows, one read of the frame, the fewest values written:
    ~4x faster than a float luma plane then a resize at 640x480 rgb8), then the luma and
    the horizontal step on out_h rows. Equals the general path up to float32 rounding
    (tested); None when it does not apply."""
    if image.dtype not in (np.uint8, np.uint16) or image.ndim not in (2, 3):
        return None
    h, w = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    out_h, out_w = config.input_height, config.input_width
    if channels not in (1, 3, 4) or h < out_h or w < out_w or (h, w) == (out_h, out_w):
        return None
    if not image.flags.c_contiguous:  # padded rows: the general path (decode_image packs them)
        return None
    rows = image.reshape(h, w * channels)
    sums, divisor = _vertical_area_sums(rows, out_h)
    scale = 1.0 / (full_scale(image.dtype) * divisor)
    if channels == 1:
        gray = np.multiply(sums, np.float32(scale), out=sums)
    else:
        gray = cv2.transform(sums.reshape(out_h, w, channels), _sum_luma_matrix(channels, scale))
    if w != out_w:
        gray = cv2.resize(gray, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return np.clip(gray, 0.0, 1.0, out=gray)


def preprocess(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Camera image -> float32 network input of shape (input_height, input_width) in [0, 1]:
    BT.601 luma of the RGB(A) frame (or the mono frame) scaled to [0, 1], area-resized."""
    fast = _area_gray_integer(image, config)
    return fast if fast is not None else resize_image(to_gray_float(image), config)


def scale_keypoints(
    keypoints_px: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]
) -> np.ndarray:
    """Map pixel keypoints (..., 2) from an image of size src_hw to one of size dst_hw
    (pixel-centre convention: x' + 0.5 = (x + 0.5) * W'/W)."""
    sy = dst_hw[0] / src_hw[0]
    sx = dst_hw[1] / src_hw[1]
    out = np.asarray(keypoints_px, dtype=np.float64).copy()
    out[..., 0] = (out[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (out[..., 1] + 0.5) * sy - 0.5
    return out


def pixels_to_normalised(keypoints_px: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel coordinates (..., 2) -> normalised coordinates in [-1, 1]."""
    kp = np.asarray(keypoints_px, dtype=np.float64)
    size = np.array([width, height], dtype=np.float64)
    return 2.0 * (kp + 0.5) / size - 1.0


def pixel_affine(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The map from normalised network outputs (x, y) to pixel coordinates, px = scale * y +
    offset (pixel-centre convention: -1 is the left/top edge, +1 the right/bottom one); the
    certification engine's ``PixelMap`` uses exactly these numbers."""
    scale = np.array([width / 2.0, height / 2.0], dtype=np.float64)
    return scale, scale - 0.5


def normalised_to_pixels(keypoints_norm: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalised coordinates (..., 2) -> pixel coordinates (:func:`pixel_affine`)."""
    scale, offset = pixel_affine(height, width)
    return np.asarray(keypoints_norm, dtype=np.float64) * scale + offset
