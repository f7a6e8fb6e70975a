"""COCO keypoints folders: round trip and precise errors on bad input."""

import json
import logging

import numpy as np
import pytest

from usn_offline.data import load_split, write_split
from usn_offline.data.coco import annotation_path, default_input_side
from usn_offline.errors import DatasetError
from usn_offline.runtime.preprocess import PreprocessConfig


def _write_small(root, n=5, size=32, k=4, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(size, size), dtype=np.uint8) for _ in range(n)]
    keypoints = rng.uniform(0, size - 1, size=(n, k, 2))
    names = tuple(f"kp{i}" for i in range(k))
    write_split(root, "train", images, keypoints, names, skeleton=((1, 2),))
    return images, keypoints, names


def test_round_trip_preserves_images_and_keypoints(tmp_path):
    images, keypoints, names = _write_small(tmp_path)
    ds = load_split(tmp_path, "train")
    assert ds.keypoint_names == names
    np.testing.assert_allclose(ds.keypoints, keypoints, atol=1e-5)
    np.testing.assert_allclose(ds.images, np.stack(images) / 255.0, atol=1e-6)
    assert ds.file_names[0] == "train/train_000000.png"


def test_rewriting_a_split_smaller_removes_its_own_stale_images_only(tmp_path):
    _write_small(tmp_path, n=5)
    theirs = tmp_path / "images" / "train" / "notes.png"
    theirs.write_bytes(b"the user's")
    _write_small(tmp_path, n=2, seed=1)
    left = sorted(p.name for p in (tmp_path / "images" / "train").iterdir())
    assert left == ["notes.png", "train_000000.png", "train_000001.png"]
    assert len(load_split(tmp_path, "train")) == 2


def test_generated_dataset_loads_every_split(tiny_dataset):
    for split, n in (("train", 96), ("val", 24), ("test", 24)):
        ds = load_split(tiny_dataset, split)
        assert len(ds) == n and ds.images.shape[1:] == (64, 64) and ds.num_keypoints == 4


def test_resizing_to_the_input_size_rescales_keypoints(tmp_path):
    image = np.zeros((40, 80), np.uint8)
    image[10, 20] = 255
    write_split(tmp_path, "train", [image], np.array([[[20.0, 10.0]] * 4]), ("a", "b", "c", "d"))
    ds = load_split(tmp_path, "train", PreprocessConfig(20, 40))
    np.testing.assert_allclose(ds.keypoints[0, 0], [(20.5) / 2 - 0.5, (10.5) / 2 - 0.5])


def test_color_images_are_converted_to_gray(tmp_path):
    import cv2

    _write_small(tmp_path, n=1)
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 2] = 255  # pure red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "images/train/train_000000.png"), rgb)
    ds = load_split(tmp_path, "train")
    assert ds.images[0].mean() == pytest.approx(0.299, abs=0.01)


def test_missing_annotation_file_names_it(tmp_path):
    tmp_path.joinpath("annotations").mkdir()
    with pytest.raises(DatasetError, match=r"annotation file not found: .*val\.json"):
        load_split(tmp_path, "val")


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_split(tmp_path / "nope", "train")


def test_wrong_keypoint_count_names_the_image(tmp_path):
    _write_small(tmp_path)
    path = annotation_path(tmp_path, "train")
    doc = json.loads(path.read_text())
    doc["annotations"][2]["keypoints"] = doc["annotations"][2]["keypoints"][:9]
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"train_000002\.png' has 3 keypoints, expected 4"):
        load_split(tmp_path, "train")


def test_expected_keypoint_count_is_checked(tmp_path):
    _write_small(tmp_path)
    with pytest.raises(DatasetError, match="has 4 keypoints per object, the model expects 5"):
        load_split(tmp_path, "train", expected_keypoints=5)


def test_corrupt_image_names_the_file(tmp_path):
    _write_small(tmp_path)
    (tmp_path / "images/train/train_000003.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DatasetError, match=r"cannot decode image .*train_000003\.png"):
        load_split(tmp_path, "train")


def test_missing_image_names_the_file(tmp_path):
    _write_small(tmp_path)
    (tmp_path / "images/train/train_000001.png").unlink()
    with pytest.raises(DatasetError, match=r"image file not found: .*train_000001\.png"):
        load_split(tmp_path, "train")


def test_invalid_json(tmp_path):
    _write_small(tmp_path)
    annotation_path(tmp_path, "train").write_text("{not json")
    with pytest.raises(DatasetError, match=r"train\.json: not valid JSON"):
        load_split(tmp_path, "train")


def test_empty_split_is_an_error(tmp_path):
    write_split(tmp_path, "test", [], np.zeros((0, 4, 2)), ("a", "b", "c", "d"))
    with pytest.raises(DatasetError, match="split 'test' has no usable images"):
        load_split(tmp_path, "test")


def test_skipped_images_are_counted_in_the_log(tmp_path, caplog):
    _write_small(tmp_path)
    path = annotation_path(tmp_path, "train")
    doc = json.loads(path.read_text())
    doc["annotations"] = doc["annotations"][:3]  # images 3 and 4 lose their annotation
    doc["annotations"][0]["keypoints"][2] = 0  # first keypoint of image 0 not visible
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        ds = load_split(tmp_path, "train")
    assert len(ds) == 2
    assert "skipped 2 image(s): no annotation" in caplog.text
    assert "skipped 1 image(s): keypoint not labelled" in caplog.text


def test_only_visible_keypoints_count_unless_asked(tmp_path, caplog):
    """COCO v = 1 (labelled but not visible) is not trained on by default; min_visibility=1
    takes it; v = 0 (not labelled) never."""
    _write_small(tmp_path)
    path = annotation_path(tmp_path, "train")
    doc = json.loads(path.read_text())
    doc["annotations"][0]["keypoints"][2] = 1
    doc["annotations"][1]["keypoints"][5] = 0
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        assert len(load_split(tmp_path, "train")) == 3
    assert "keypoint labelled but not visible" in caplog.text and "keypoint not labelled" in caplog.text
    assert len(load_split(tmp_path, "train", min_visibility=1)) == 4
    with pytest.raises(DatasetError, match="min_visibility must be 1 or 2"):
        load_split(tmp_path, "train", min_visibility=3)


@pytest.mark.parametrize("size, want", [((80, 80), (80, "the train images' own size")),
                                        ((160, 160), (64, "larger than 128x128")),
                                        ((48, 64), (64, "not square"))])
def test_input_side_comes_from_the_data(tmp_path, size, want):
    h, w = size
    write_split(tmp_path, "train", [np.zeros((h, w), np.uint8)], np.zeros((1, 4, 2)), ("a", "b", "c", "d"))
    side, why = default_input_side(tmp_path)
    assert side == want[0] and want[1] in why
    assert default_input_side(tmp_path / "missing")[0] == 64


def _edit(root, edit):
    path = annotation_path(root, "train")
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["images"][1].update(file_name="/etc/passwd"), "must be a path inside the dataset's images/"),
    (lambda d: d["images"][1].update(file_name="../../secret.png"), "must be a path inside the dataset's images/"),
    (lambda d: d["images"][1].update(file_name="train/../../x.png"), "must be a path inside the dataset's images/"),
    (lambda d: d["images"][1].update(file_name="C:\\data\\x.png"), "must be a path inside the dataset's images/"),
    (lambda d: d["images"][1].update(file_name=7), "file_name must be a non-empty string, got 7"),
    (lambda d: d["images"][1].update(id=[1, 2]), "image id must be an integer or a string"),
    (lambda d: d["annotations"][1].update(image_id=[1]), "annotation image_id must be an integer or a string"),
    (lambda d: d["images"][2].update(id=d["images"][1]["id"]), "duplicate image id"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(0, float("nan")), "NaN is not a JSON number"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(0, 1e6), r"at \(1e\+06, .*\) lies outside the 32x32"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(1, -3),
     r"annotation \d+ of image .* \(id \d+\): keypoint kp0 at \(.*, -3\) lies outside the 32x32 image"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(0, "12"), "keypoints must be numbers"),
])
def test_malformed_annotations_give_one_clear_error(tmp_path, edit, message):
    _write_small(tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(DatasetError, match=message):
        load_split(tmp_path, "train")


def test_a_float_image_with_nan_pixels_is_refused_naming_it(tmp_path):
    import cv2

    _write_small(tmp_path)
    doc = json.loads(annotation_path(tmp_path, "train").read_text())
    image = np.full((32, 32), 0.5, np.float32)
    image[3, 4] = np.nan
    assert cv2.imwrite(str(tmp_path / "images" / "train" / "float.tiff"), image)
    doc["images"][1]["file_name"] = "train/float.tiff"
    annotation_path(tmp_path, "train").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="float.tiff: float image contains NaN or infinite pixels"):
        load_split(tmp_path, "train")


def test_an_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path):
    import struct
    import zlib

    _write_small(tmp_path)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body)))
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    (tmp_path / "images/train/train_000003.png").write_bytes(bomb)
    with pytest.raises(DatasetError, match=r"train_000003\.png: declares 20000x20000 pixels, over the limit"):
        load_split(tmp_path, "train")
