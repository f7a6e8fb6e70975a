"""sensor_msgs/Image decoding: every supported encoding, step padding, endianness, and a
clear error for everything else; agreement with cv_bridge where cv_bridge is right."""

import cv2
import numpy as np
import pytest

from usn_offline.runtime.image_decode import ImageDecodeError, decode_image


def _payload(arr: np.ndarray, pad: int = 0, big: bool = False) -> tuple[bytes, int]:
    if big:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    rows = arr.reshape(arr.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((arr.shape[0], pad), 7, np.uint8)], axis=1)
    return padded.tobytes(), padded.shape[1]


RGB = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding,arr,expected", [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[:, :, ::-1].copy(), RGB),
    ("rgba8", np.dstack([RGB, np.full((5, 6), 9, np.uint8)]), np.dstack([RGB, np.full((5, 6), 9, np.uint8)])),
    ("bgra8", np.dstack([RGB[:, :, ::-1], np.full((5, 6), 9, np.uint8)]),
     np.dstack([RGB, np.full((5, 6), 9, np.uint8)])),
    ("mono8", RGB[:, :, 0].copy(), RGB[:, :, 0]),
    ("mono16", RGB[:, :, 0].astype(np.uint16) * 257, RGB[:, :, 0].astype(np.uint16) * 257),
    ("16UC1", np.full((5, 6), 1000, np.uint16), np.full((5, 6), 1000, np.uint16)),
    ("32FC1", RGB[:, :, 0].astype(np.float32) / 255, RGB[:, :, 0].astype(np.float32) / 255),
])
def test_encodings_with_and_without_row_padding(encoding, arr, expected, pad):
    data, step = _payload(arr, pad)
    out = decode_image(arr.shape[0], arr.shape[1], encoding, False, step, data)
    np.testing.assert_array_equal(out, expected)


def test_big_endian_mono16():
    arr = np.array([[1, 256, 65535, 4660]], np.uint16)
    data, step = _payload(arr, big=True)
    out = decode_image(1, 4, "mono16", True, step, data)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.uint16 and out.dtype.byteorder in ("=", "<", "|")


@pytest.mark.parametrize("encoding", ["yuv422", "yuv422_yuy2"])
def test_yuv422(encoding):
    gray = np.full((4, 6), 128, np.uint8)
    # Packed 4:2:2 of a uniform mid-grey image: Y = 128, U = V = 128.
    packed = np.full((4, 6, 2), 128, np.uint8)
    data, step = _payload(packed)
    out = decode_image(4, 6, encoding, False, step, data)
    assert out.shape == (4, 6, 3)
    np.testing.assert_allclose(out[..., 0], gray, atol=2)


@pytest.mark.parametrize("args,fragment", [
    ((5, 6, "bayer_rggb8", False, 6, bytes(30)), "unsupported encoding 'bayer_rggb8'"),
    ((0, 6, "mono8", False, 6, b""), "empty image"),
    ((5, 6, "rgb8", False, 10, bytes(50)), "step 10 is smaller than one row"),
    ((5, 6, "mono8", False, 6, bytes(29)), "data has 29 bytes, expected step * height = 30"),
    ((5000, 5000, "mono8", False, 5000, b""), "exceeds the limit"),
    ((2, 3, "yuv422", False, 6, bytes(12)), "needs an even width"),
    ((1, 2, "32FC1", False, 8, np.array([[0.5, np.nan]], np.float32).tobytes()), "NaN"),
])
def test_bad_messages_have_clear_errors(args, fragment):
    with pytest.raises(ImageDecodeError, match=fragment.replace("*", r"\*")):
        decode_image(*args)


def test_agrees_with_cv_bridge_where_cv_bridge_is_right():
    cv_bridge = pytest.importorskip("cv_bridge")
    from sensor_msgs.msg import Image

    bridge = cv_bridge.CvBridge()
    for encoding, arr in (("mono8", RGB[:, :, 0].copy()), ("mono16", RGB[:, :, 1].astype(np.uint16) * 200),
                          ("32FC1", RGB[:, :, 2].astype(np.float32))):
        msg = Image(height=5, width=6, encoding=encoding, is_bigendian=0, step=arr.strides[0],
                    data=arr.tobytes())
        ours = decode_image(msg.height, msg.width, msg.encoding, bool(msg.is_bigendian), msg.step,
                            bytes(msg.data))
        np.testing.assert_array_equal(ours, bridge.imgmsg_to_cv2(msg, "passthrough"))


def test_compressed_png_and_jpeg():
    from usn_offline.runtime.image_decode import decode_compressed

    ok, png = cv2.imencode(".png", RGB[:, :, ::-1])  # OpenCV encodes BGR
    np.testing.assert_array_equal(decode_compressed("png", png.tobytes()), RGB)
    ok, jpg = cv2.imencode(".jpg", np.full((16, 16), 100, np.uint8))
    assert np.abs(decode_compressed("jpeg", jpg.tobytes()).astype(int) - 100).max() <= 2
    with pytest.raises(ImageDecodeError, match="cannot decode compressed image"):
        decode_compressed("jpeg", b"not an image")
    with pytest.raises(ImageDecodeError, match="empty compressed image"):
        decode_compressed("jpeg", b"")


def test_compressed_size_is_checked_before_decoding():
    """A small PNG or JPEG that declares a huge image is refused from its header, without
    decoding (the issue's 214 KB PNG of 15000x15000 took 2 s and 441 MB)."""
    import struct
    import zlib

    from usn_offline.runtime.image_decode import compressed_size, decode_compressed

    ok, png = cv2.imencode(".png", np.zeros((30, 40), np.uint8))
    ok, jpg = cv2.imencode(".jpg", np.zeros((30, 40, 3), np.uint8))
    ok, progressive = cv2.imencode(".jpg", np.zeros((30, 40), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    for blob in (png, jpg, progressive):
        assert compressed_size(blob.tobytes()) == (40, 30)
    # A hand-made PNG header declaring 15000 x 15000 (IHDR, then a tiny IDAT):
    ihdr = struct.pack(">IIBBBBB", 15000, 15000, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body)))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(
        b"IEND", b"")
    assert compressed_size(bomb) == (15000, 15000)
    with pytest.raises(ImageDecodeError, match="declares 15000x15000, over the limit of 16777216 pixels"):
        decode_compressed("png", bomb)
    big_jpeg = bytearray(jpg.tobytes())
    sof = big_jpeg.index(b"\xff\xc0")
    big_jpeg[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    with pytest.raises(ImageDecodeError, match="declares 20000x20000"):
        decode_compressed("jpeg", bytes(big_jpeg))
    with pytest.raises(ImageDecodeError, match="over the limit of 1000 pixels"):
        decode_compressed("png", png.tobytes(), max_pixels=1000)
    for cut in (png.tobytes()[:20], jpg.tobytes()[:3], b"GIF89a....", b"\xff\xd8\xff\xda\x00\x02"):
        assert compressed_size(cut) is None
        with pytest.raises(ImageDecodeError, match="cannot decode compressed image"):
            decode_compressed("png", cut)


def test_a_jpeg_whose_frame_header_follows_large_app_segments_decodes():
    """Three 60 KB APP2 segments (an ICC profile's size) put the frame header ~180 KB in."""
    import array
    import struct

    from usn_offline.runtime.image_decode import compressed_size, decode_compressed

    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
    jpg = cv2.imencode(".jpg", image)[1].tobytes()
    app2 = b"\xff\xe2" + struct.pack(">H", 60002) + bytes(60000)
    padded = jpg[:2] + app2 * 3 + jpg[2:]
    assert padded.index(b"\xff\xc0") > 180_000
    assert compressed_size(padded) == (40, 30)
    assert compressed_size(array.array("B", padded)) == (40, 30)  # how rclpy hands over uint8[]
    np.testing.assert_array_equal(decode_compressed("jpeg", array.array("B", padded)),
                                  decode_compressed("jpeg", jpg))
    # Endless empty segments are not scanned to the end.
    assert compressed_size(jpg[:2] + b"\xff\xe3\x00\x02" * 100_000 + jpg[2:]) is None
