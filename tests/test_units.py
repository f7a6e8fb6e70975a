"""Pixel units end to end: data stored at another size than the network input (128x96
images, 64x64 network) reads in the images' own pixels in evaluate and in the
certificate, with the network-pixel figures the proof needs kept beside them. (The node's
status on camera-size frames: tests/test_keypoint_node.py, delta per axis in the frame's
pixels.)"""

import json

import cv2
import numpy as np
import pytest
import torch

from usn_offline.cli import main
from usn_offline.data import load_split, write_split
from usn_offline.runtime.preprocess import scale_keypoints
from usn_offline.train import load_checkpoint

STORED_HW = (96, 128)  # h, w: 1.5 image px per network px in y, 2 in x


@pytest.fixture(scope="module")
def stored_elsewhere(tiny_dataset, tmp_path_factory):
    """The tiny dataset's first test images stored at 128x96, keypoints moved with them."""
    test = load_split(tiny_dataset, "test").subset(slice(0, 4))
    images = [cv2.resize((255 * im).round().astype(np.uint8), STORED_HW[::-1], interpolation=cv2.INTER_LINEAR)
              for im in test.images]
    keypoints = scale_keypoints(test.keypoints, test.image_hw, STORED_HW)
    root = tmp_path_factory.mktemp("stored_128x96")
    write_split(root, "test", images, keypoints, test.keypoint_names)
    return root


def test_evaluate_reports_the_images_own_pixels(tiny_checkpoint, stored_elsewhere, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(stored_elsewhere),
                 "--split", "test", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    # The same error measured independently: predictions mapped to 128x96 by the pixel-centre map.
    model, info = load_checkpoint(tiny_checkpoint)
    data = load_split(stored_elsewhere, "test", info.preprocess)
    with torch.no_grad():
        out_norm = model(torch.from_numpy(data.images)[:, None].float()).numpy().reshape(len(data), -1, 2)
    net_px = (out_norm + 1) / 2 * np.array([64, 64]) - 0.5
    truth = scale_keypoints(data.keypoints, (64, 64), STORED_HW)
    error = np.linalg.norm(scale_keypoints(net_px, (64, 64), STORED_HW) - truth, axis=-1).mean()
    assert doc["image_px"]["sizes"] == ["128x96"]
    assert doc["image_px"]["mean_px_error"] == pytest.approx(error, rel=1e-4)
    net_error = np.linalg.norm(net_px - data.keypoints, axis=-1).mean()
    assert doc["mean_px_error"] == pytest.approx(net_error, rel=1e-4)  # network pixels kept beside
    assert 1.5 * net_error <= error <= 2 * net_error


def test_the_certificate_states_delta_and_bounds_in_both_units(tiny_checkpoint, stored_elsewhere, tmp_path,
                                                              capsys):
    out = tmp_path / "cert.json"
    assert main(["certify", "--checkpoint", str(tiny_checkpoint), "--data", str(stored_elsewhere), "--split",
                 "test", "--num-images", "3", "--delta", "2", "--contrast", "0.995", "1.005", "--brightness",
                 "-0.005", "0.005", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "network input 64x64" in printed and "delta in image pixels" in printed
    assert "x 4 px, y 3 px (stored 128x96)" in printed
    doc = json.loads(out.read_text())
    prop = doc["property"]
    assert prop["delta_px"] == 2.0 and prop["network_input_hw"] == [64, 64]
    assert prop["delta_image_px"] == {"x": [4.0, 4.0], "y": [3.0, 3.0]}
    certified = 0
    for image in doc["images"]:
        assert image["image_hw"] == [96, 128] and image["delta_image_px"] == [4.0, 3.0]
        if image["status"] != "certified":
            assert "bound_image_px" not in image
            continue
        certified += 1
        ref, lo, hi = (np.reshape(image[k], (-1, 2)) for k in ("reference_px", "lower_px", "upper_px"))
        bound_net = np.maximum(ref - lo, hi - ref).max(axis=0)
        assert image["bound_image_px"] == pytest.approx((bound_net * [2.0, 1.5]).tolist())
        assert np.all(np.array(image["bound_image_px"]) <= [4.0, 3.0])
    assert certified >= 1
