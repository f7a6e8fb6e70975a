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
