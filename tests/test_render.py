"""The built-in generator: determinism and exact keypoint geometry."""

import numpy as np
import pytest

from usn_offline.data.backgrounds import load_backgrounds
from usn_offline.data.generator import GeneratorConfig, render_split
from usn_offline.data.render import RenderConfig, project, render_scene, sample_homography, warp_texture
from usn_offline.data.target import TARGETS, make_pad_texture
from usn_offline.errors import ConfigError


def _polygon_area_centroid(points: np.ndarray) -> tuple[float, float, float]:
    x, y = points[:, 0], points[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * area)
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
    return abs(area), cx, cy


def test_split_is_deterministic_and_seed_dependent():
    config = GeneratorConfig(num_train=6, num_val=2, num_test=2, seed=11)
    images_a, kps_a = render_split(config, "train", progress=False)
    images_b, kps_b = render_split(config, "train", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(images_a, images_b, strict=True))
    np.testing.assert_array_equal(kps_a, kps_b)
    other, _ = render_split(GeneratorConfig(num_train=6, seed=12), "train", progress=False)
    assert not any(np.array_equal(a, b) for a, b in zip(images_a, other, strict=True))
    test_images, _ = render_split(config, "test", progress=False)
    assert not np.array_equal(images_a[0], test_images[0])


@pytest.mark.parametrize("seed", range(8))
def test_keypoints_are_the_projected_pad_corners(seed):
    """The rendered pad's coverage has exactly the area and centroid of the keypoint polygon."""
    config = RenderConfig()
    texture = make_pad_texture(config.texture_size)
    homography = sample_homography(np.random.default_rng(seed), texture, config)
    keypoints = project(homography, texture.keypoints)
    _, alpha = warp_texture(texture.image, homography, config.image_size, config.supersample)
    area, cx, cy = _polygon_area_centroid(keypoints)
    yy, xx = np.mgrid[0:config.image_size, 0:config.image_size]
    assert alpha.sum() == pytest.approx(area, rel=2e-3)
    assert (alpha * xx).sum() / alpha.sum() == pytest.approx(cx, abs=0.02)
    assert (alpha * yy).sum() / alpha.sum() == pytest.approx(cy, abs=0.02)


def test_known_texture_point_lands_where_projected():
    """A bright dot drawn in the texture appears at the homography's image of its centre."""
    config = RenderConfig()
    texture = make_pad_texture(config.texture_size)
    dot = np.zeros_like(texture.image)
    centre = np.array([30.0, 61.0])
    dot[59:64, 28:33] = 1.0
    homography = sample_homography(np.random.default_rng(5), texture, config)
    warped, _ = warp_texture(dot, homography, config.image_size, config.supersample)
    yy, xx = np.mgrid[0:config.image_size, 0:config.image_size]
    found = np.array([(warped * xx).sum(), (warped * yy).sum()]) / warped.sum()
    np.testing.assert_allclose(found, project(homography, centre[None])[0], atol=0.05)


def test_rendered_scene_keeps_keypoints_inside_the_image():
    config = RenderConfig()
    photos = load_backgrounds()
    for seed in range(20):
        image, keypoints = render_scene(np.random.default_rng(seed), photos, config)
        assert image.shape == (64, 64) and image.dtype == np.uint8
        assert keypoints.shape == (4, 2)
        assert keypoints.min() >= config.margin_px - 0.5
        assert keypoints.max() <= 64 - 0.5 - config.margin_px
        assert image.std() > 5  # not blank


def test_bad_render_config_is_rejected():
    with pytest.raises(ConfigError, match="scale_range"):
        RenderConfig(scale_range=(0.8, 0.2))
    with pytest.raises(ConfigError, match="num_train"):
        GeneratorConfig(num_train=0)


@pytest.mark.parametrize("seed", range(4))
def test_hexagon_keypoints_are_its_projected_vertices_and_centre(seed):
    """The docking hexagon's rendered coverage has the area and centroid of its projected
    vertex polygon, and its centre keypoint is the projected texture centre."""
    config = RenderConfig(target="docking_hexagon", max_rotation_deg=180.0)
    texture = TARGETS["docking_hexagon"].draw(config.texture_size, 0.2, 0.9)
    assert texture.keypoints.shape == (7, 2) and len(TARGETS["docking_hexagon"].keypoint_names) == 7
    homography = sample_homography(np.random.default_rng(seed), texture, config)
    keypoints = project(homography, texture.keypoints)
    _, alpha = warp_texture(texture.image, homography, config.image_size, config.supersample, texture.mask)
    area, cx, cy = _polygon_area_centroid(keypoints[:6])
    yy, xx = np.mgrid[0:config.image_size, 0:config.image_size]
    assert alpha.sum() == pytest.approx(area, rel=5e-3)
    assert (alpha * xx).sum() / alpha.sum() == pytest.approx(cx, abs=0.04)
    assert (alpha * yy).sum() / alpha.sum() == pytest.approx(cy, abs=0.04)
    c = (config.texture_size - 1) / 2
    np.testing.assert_allclose(keypoints[6], project(homography, np.array([[c, c]]))[0])


def test_hexagon_dataset_turns_all_the_way_round(tmp_path):
    """Rotations of the docking target cover more than the landing pad's +-40 degrees."""
    config = GeneratorConfig(num_train=40, render=RenderConfig(target="docking_hexagon", max_rotation_deg=180.0))
    _, kps = render_split(config, "train", progress=False)
    up = kps[:, 0] - kps[:, 6]  # centre -> vertex 0
    angles = np.degrees(np.arctan2(up[:, 0], -up[:, 1]))
    assert kps.shape == (40, 7, 2) and np.abs(angles).max() > 120
    with pytest.raises(ConfigError, match="unknown target 'hexagon'"):
        RenderConfig(target="hexagon")
