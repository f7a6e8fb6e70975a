"""Geometric augmentation a dataset declares: parsed and checked, used by `train` unless
its options say otherwise, and mirroring that exchanges the declared keypoints."""

import json

import numpy as np
import pytest
import torch

from usn_offline.cli import main
from usn_offline.data import GeneratorConfig, RenderConfig, generate_dataset, load_split
from usn_offline.data.augmentation import GeometricAugmentation, parse_augmentation
from usn_offline.data.coco import annotation_path
from usn_offline.data.target import HEXAGON_KEYPOINT_NAMES, TARGETS, make_hexagon_texture
from usn_offline.errors import DatasetError
from usn_offline.runtime.preprocess import normalised_to_pixels, pixels_to_normalised
from usn_offline.train import TrainConfig
from usn_offline.train.loop import geometric_batch

NAMES = ("a", "b", "c")


def test_declarations_parse_and_bad_ones_name_the_problem():
    parsed = parse_augmentation({"rotation_deg": 15, "scale": [0.9, 1.1], "flip_pairs": [["a", "c"]]}, NAMES, "f")
    assert parsed == GeometricAugmentation(15.0, (0.9, 1.1), ((0, 2),))
    assert parse_augmentation({"flip_pairs": []}, NAMES, "f").flip_pairs == ()  # mirror, nothing exchanged
    assert parse_augmentation({}, NAMES, "f") == GeometricAugmentation()
    for bad, message in (([], "must be an object"), ({"rotate": 3}, "unknown category 'augmentation' field"),
                         ({"rotation_deg": 200}, "rotation_deg must be a number in"),
                         ({"rotation_deg": True}, "rotation_deg must be a number in"),
                         ({"scale": [1.2, 0.8]}, "scale must be"), ({"scale": [0.9]}, "scale must be"),
                         ({"flip_pairs": [["a", "z"]]}, "must name two different keypoints"),
                         ({"flip_pairs": [["a", "a"]]}, "must name two different keypoints"),
                         ({"flip_pairs": [["a", "b"], ["b", "c"]]}, "twice"),
                         ({"flip_pairs": "a,b"}, "list of")):
        with pytest.raises(DatasetError, match=message) as info:
            parse_augmentation(bad, NAMES, "ann.json")
        assert str(info.value).startswith("ann.json: ") and "\n" not in str(info.value)


def test_the_hexagon_is_its_own_mirror_image_with_the_declared_pairs_exchanged():
    texture = make_hexagon_texture(96)
    pairs = parse_augmentation(TARGETS["docking_hexagon"].augmentation, HEXAGON_KEYPOINT_NAMES, "x").flip_pairs
    difference = np.abs(texture.image[:, ::-1] - texture.image)
    assert difference.mean() < 1e-3 and difference.max() < 0.1  # symmetric up to edge rasterisation
    mirrored = texture.keypoints * [-1, 1] + [texture.size - 1, 0]
    order = list(range(len(mirrored)))
    for i, j in pairs:
        order[i], order[j] = j, i
    np.testing.assert_allclose(mirrored[order], texture.keypoints, atol=1e-9)
    assert TARGETS["landing_pad"].augmentation is None  # its mirror image is no view of the pad


def test_mirroring_moves_and_exchanges_keypoints():
    """Blobs of different brightness at three keypoints: after a mirror, each keypoint's
    new position holds the blob of the keypoint it was exchanged with."""
    h, w = 24, 40
    points = np.array([[5.0, 6.0], [30.0, 8.0], [12.0, 18.0]])
    image = np.zeros((h, w), np.float32)
    for (x, y), level in zip(points, (0.3, 0.6, 0.9), strict=True):
        image[int(y), int(x)] = level
    x = torch.from_numpy(np.stack([image] * 16))[:, None]
    y = torch.from_numpy(pixels_to_normalised(points, h, w).astype(np.float32)).reshape(1, -1).repeat(16, 1)
    out, moved = geometric_batch(x, y, TrainConfig(augment_flip_pairs=((0, 1),)), torch.Generator().manual_seed(0))
    flipped = [i for i in range(16) if not torch.equal(out[i], x[i])]
    assert 3 <= len(flipped) <= 13  # about half
    for i in range(16):
        got = normalised_to_pixels(moved[i].numpy().reshape(-1, 2).astype(np.float64), h, w)
        levels = [float(out[i, 0, int(round(py)), int(round(px))]) for px, py in got]
        if i in flipped:
            assert levels == pytest.approx([0.6, 0.3, 0.9])  # 0 and 1 exchanged, 2 kept
            np.testing.assert_allclose(got[2], [w - 1 - 12.0, 18.0], atol=1e-4)
        else:
            assert levels == pytest.approx([0.3, 0.6, 0.9]) and torch.equal(moved[i], y[i])


def _hexagon_data(root):
    generate_dataset(root, GeneratorConfig(num_train=24, num_val=8, num_test=8, seed=1,
                                           render=RenderConfig(target="docking_hexagon")), progress=False)
    return root


def test_train_uses_the_declaration_unless_told_otherwise(tmp_path, capsys):
    data = _hexagon_data(tmp_path / "hex")
    assert load_split(data, "train").augmentation.flip_pairs == ((1, 5), (2, 4))
    assert load_split(data, "train").subset(slice(0, 2)).augmentation.rotation_deg == 30.0
    common = ["train", "--data", str(data), "--epochs", "1", "--widths", "4", "4", "4", "4", "4", "--hidden", "8",
              "--quiet"]
    assert main([*common, "--out", str(tmp_path / "m.pt")]) == 0
    assert "geometric augmentation: rotation up to +-30 deg, scale 0.85-1, horizontal mirroring (2 keypoint " \
           "pair(s) exchanged) (the dataset's declaration)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "m.json").read_text())["training"]["config"]
    assert saved["augment_rotation_deg"] == 30.0 and saved["augment_flip_pairs"] == [[1, 5], [2, 4]]
    assert main([*common, "--out", str(tmp_path / "n.pt"), "--augment-rotation", "0", "--no-augment-flip"]) == 0
    assert "geometric augmentation: scale 0.85-1 (the dataset's declaration, --augment-rotation, " \
           "--augment-flip from the command line)" in capsys.readouterr().out
    # Pruning fine-tunes with the same declaration.
    assert main(["prune", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(data), "--ratio", "0.2",
                 "--rounds", "1", "--finetune-epochs", "1", "--score-images", "8", "--out", str(tmp_path / "p.pt"),
                 "--quiet"]) == 0
    assert "fine-tuning with geometric augmentation: rotation up to +-30 deg, scale 0.85-1, horizontal " \
           "mirroring" in capsys.readouterr().out


def test_mirroring_a_target_that_declares_no_pairs_is_refused(tmp_path, capsys):
    data = tmp_path / "pad"
    generate_dataset(data, GeneratorConfig(num_train=8, num_val=4, num_test=4, seed=1), progress=False)
    assert load_split(data, "train").augmentation == GeometricAugmentation()
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--epochs", "1", "--augment-flip"])
    err = capsys.readouterr().err
    assert code != 0 and "--augment-flip needs the dataset to declare" in err and len(err.strip().splitlines()) == 1
    # A user's COCO file declaring something malformed stops with the file named.
    path = annotation_path(data, "train")
    doc = json.loads(path.read_text())
    doc["categories"][0]["augmentation"] = {"flip_pairs": [["top_left", "nowhere"]]}
    path.write_text(json.dumps(doc))
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code != 0 and str(path) in err and "nowhere" in err
