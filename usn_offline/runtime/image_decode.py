"""Decode sensor_msgs/Image payloads into numpy arrays (torch-free, ROS-free).

Respects ``encoding``, ``step`` (row padding) and ``is_bigendian``. Why not cv_bridge
alone: the PyPI ``cv-bridge`` wheel (the one installable without a ROS distribution)
decodes every multi-channel encoding with a wrong channel count (rgb8 -> 9 channels),
maps 16UC1 to 8 bit, ignores ``step`` and crashes on big-endian data under NumPy 2; the
C++-backed cv_bridge of a ROS install is fine but would make the two environments behave
differently. The results agree with cv_bridge wherever cv_bridge is right (tested).
"""

from __future__ import annotations

import cv2
import numpy as np

# encoding -> (numpy dtype, channels, conversion to RGB/RGBA/mono or None)
ENCODINGS: dict[str, tuple[str, int, int | None]] = {
    "mono8": ("u1", 1, None),
    "8UC1": ("u1", 1, None),
    "mono16": ("u2", 1, None),
    "16UC1": ("u2", 1, None),
    "rgb8": ("u1", 3, None),
    "bgr8": ("u1", 3, cv2.COLOR_BGR2RGB),
    "rgba8": ("u1", 4, None),
    "bgra8": ("u1", 4, cv2.COLOR_BGRA2RGBA),
    "yuv422": ("u1", 2, cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": ("u1", 2, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": ("u1", 2, cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": ("u1", 2, cv2.COLOR_YUV2RGB_YUY2),
    "32FC1": ("f4", 1, None),
}


class ImageDecodeError(ValueError):
    """The message cannot be turned into an image; the text says why."""


def decode_image(height: int, width: int, encoding: str, is_bigendian: bool, step: int,
                 data: bytes | bytearray | memoryview, max_pixels: int = 4096 * 4096) -> np.ndarray:
    """(H, W) or (H, W, C) array: mono as is, colour as RGB(A); uint8, uint16 or float32."""
    if encoding not in ENCODINGS:
        raise ImageDecodeError(f"unsupported encoding '{encoding}' (supported: {', '.join(sorted(ENCODINGS))})")
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty image ({width}x{height})")
    if height * width > max_pixels:
        raise ImageDecodeError(f"image of {width}x{height} exceeds the limit of {max_pixels} pixels")
    kind, channels, conversion = ENCODINGS[encoding]
    dtype = np.dtype(kind).newbyteorder(">" if is_bigendian else "<")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageDecodeError(
            f"step {step} is smaller than one row of {width} {encoding} pixels ({row_bytes} bytes)")
    if len(data) != step * height:
        raise ImageDecodeError(f"data has {len(data)} bytes, expected step * height = {step * height}")
    if encoding in ("yuv422", "uyvy", "yuv422_yuy2", "yuyv") and width % 2:
        raise ImageDecodeError(f"{encoding} needs an even width, got {width}")
    buf = np.frombuffer(data, dtype=np.uint8).reshape(height, step)[:, :row_bytes]
    image = np.ascontiguousarray(buf).view(dtype).reshape(height, width, channels)
    image = image.astype(dtype.newbyteorder("="), copy=False)
    if channels == 1:
        image = image[:, :, 0]
    if conversion is not None:
        image = cv2.cvtColor(image, conversion)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ImageDecodeError("float image contains NaN or infinite values")
    return image


def decode_compressed(format_: str, data: bytes | bytearray | memoryview, max_pixels: int = 4096 * 4096
                      ) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage payload (JPEG, PNG, ...) to mono or RGB(A)."""
    if len(data) == 0:
        raise ImageDecodeError(f"empty compressed image (format '{format_}')")
    # The size a PNG or JPEG declares is checked before decoding: a small file can declare
    # a huge image (a 214 KB PNG of 15000x15000 took 2 s and 441 MB to decode).
    # The whole payload: a JPEG's frame header may follow 64 KiB and more of EXIF, ICC and
    # other APPn segments, and the scan jumps from segment to segment.
    size = compressed_size(data)
    if size is None:
        raise ImageDecodeError(f"cannot decode compressed image (format '{format_}', {len(data)} bytes): "
                               "not a PNG or JPEG with a readable header")
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(f"compressed image declares {width}x{height}, over the limit of {max_pixels} pixels")
    if width == 0 or height == 0:
        raise ImageDecodeError(f"compressed image declares an empty image ({width}x{height})")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f"cannot decode compressed image (format '{format_}', {len(data)} bytes)")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageDecodeError(f"image of {image.shape[1]}x{image.shape[0]} exceeds the limit of {max_pixels} pixels")
    return opencv_to_rgb(image)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (C0-CF except DHT C4, JPG C8 and DAC CC) carry the size.
_JPEG_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}
_JPEG_MAX_SEGMENTS = 4096


def compressed_size(head: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(width, height) a PNG or JPEG declares in its header, or None when ``head`` (the
    file, or as much of its start as holds the header; any bytes-like object, read without
    a copy) is neither or its header is cut or malformed."""
    head = memoryview(head).cast("B")
    if bytes(head[:8]) == _PNG_SIGNATURE:
        if len(head) < 24 or bytes(head[12:16]) != b"IHDR":
            return None
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if bytes(head[:2]) != b"\xff\xd8":
        return None
    i = 2
    # Real JPEGs put a few dozen segments before the frame header; a payload of thousands
    # of empty segments or fill bytes is not worth scanning to the end.
    for _ in range(_JPEG_MAX_SEGMENTS):
        if i + 4 > len(head) or head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(head[i + 2:i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > len(head) or length < 7:
                return None
            return int.from_bytes(head[i + 7:i + 9], "big"), int.from_bytes(head[i + 5:i + 7], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def opencv_to_rgb(image: np.ndarray) -> np.ndarray:
    """OpenCV's BGR(A) channel order -> RGB(A); mono images unchanged."""
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image
