"""Accuracy in the units a user reads: network-input pixels and the stored images' own."""

import numpy as np
import pytest

from usn_offline.data import load_split, write_split
from usn_offline.runtime.preprocess import PreprocessConfig
from usn_offline.train.metrics import evaluate_predictions, evaluation_table


def _mixed_sizes(root):
    """Two images stored at 128x128 and one at 64x32 (w x h), keypoints inside each."""
    names = ("a", "b")
    images = [np.full((128, 128), 100, np.uint8), np.full((128, 128), 90, np.uint8), np.full((32, 64), 80, np.uint8)]
    write_split(root, "test", images[:2], np.array([[[10.0, 20.0], [100.0, 50.0]]] * 2), names)
    doc_small = root / "small"
    write_split(doc_small, "test", images[2:], np.array([[[5.0, 6.0], [40.0, 20.0]]]), names)
    return names


def test_errors_in_image_pixels_scale_per_image_and_axis(tmp_path):
    _mixed_sizes(tmp_path)
    big = load_split(tmp_path, "test", PreprocessConfig(64, 64))
    small = load_split(tmp_path / "small", "test", PreprocessConfig(64, 64))
    assert big.source_hw.tolist() == [[128, 128], [128, 128]] and small.source_hw.tolist() == [[32, 64]]
    # A prediction 1 network pixel off in x and 1 in y.
    result = evaluate_predictions(big.keypoints + 1.0, big, (2.0, 3.0))
    assert result.mean_px_error == pytest.approx(np.sqrt(2))
    assert result.image_px.mean_px_error == pytest.approx(2 * np.sqrt(2))  # 128 / 64 on both axes
    assert result.pck == {2.0: 1.0, 3.0: 1.0} and result.image_px.pck == {2.0: 0.0, 3.0: 1.0}
    assert result.image_px.sizes == ["128x128"]
    # 64x32 stored, network 64x64: x keeps its scale, y is halved.
    result = evaluate_predictions(small.keypoints + [1.0, 2.0], small)
    assert result.image_px.mean_px_error == pytest.approx(np.sqrt(1 + 1))
    table = evaluation_table(result, small.image_hw)
    assert "network input 64x64" in table and "image pixels: stored sizes" in table and "64x32" in table
    assert "PCK@5px (image px)" in table
    assert result.to_dict()["image_px"]["sizes"] == ["64x32"]


def test_images_at_the_network_size_print_one_set_of_figures(tmp_path):
    write_split(tmp_path, "test", [np.zeros((64, 64), np.uint8)], np.array([[[3.0, 4.0]]]), ("a",))
    ds = load_split(tmp_path, "test")
    result = evaluate_predictions(ds.keypoints, ds)
    assert result.image_px.mean_px_error == 0.0
    table = evaluation_table(result, ds.image_hw)
    assert "network input 64x64" in table and "image px" not in table
