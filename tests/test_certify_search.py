"""Radius search and region maps: the search only claims what its bounded boxes proved."""

import numpy as np
import pytest
import torch
from certify_helpers import nominal_pixels  # noqa: E402  (tests/certify_helpers.py)
from torch import nn

from usn_offline.certify import (
    BabConfig,
    KeypointProperty,
    PixelMap,
    RadiusConfig,
    Status,
    certify_boxes,
    largest_certified_radius,
    lower,
    region_map,
)
from usn_offline.certify.boxes import inside, intersect, ring
from usn_offline.certify.search import STRATEGIES
from usn_offline.perturb import PhotometricBox


def test_ring_covers_outer_minus_inner():
    inner, outer = PhotometricBox(0.9, 1.1, -0.05, 0.1), PhotometricBox(0.8, 1.2, -0.2, 0.2)
    parts = ring(inner, outer)
    rng = np.random.default_rng(0)
    for a, b in zip(rng.uniform(0.8, 1.2, 2000), rng.uniform(-0.2, 0.2, 2000), strict=True):
        assert inner.contains(a, b) or any(p.contains(a, b) for p in parts)
    assert ring(outer, outer) == []
    # Brightness only: the parts stay inside the (degenerate) outer box.
    parts = ring(PhotometricBox(1, 1, -0.1, 0.1), PhotometricBox(1, 1, -0.2, 0.2))
    assert [(p.b_lo, p.b_hi) for p in parts] == [(-0.2, -0.1), (0.1, 0.2)]


def _brightness_follower():
    """Outputs = mean pixel value: every keypoint moves by 8 px per unit of brightness."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 4))
    with torch.no_grad():
        model[1].weight.fill_(1.0 / 256)
        model[1].bias.zero_()
    return lower(model.eval(), (1, 16, 16))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_radius_of_a_known_function(strategy):
    graph = _brightness_follower()
    pixels = PixelMap.for_image(2, 16, 16)
    image = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    ref = nominal_pixels(graph, image, pixels)
    # Deviation at eps: 8 px * (0.5 * eps + eps) = 12 eps px; delta = 0.6 px -> true radius 0.05.
    prop = KeypointProperty(ref, 0.6)
    config = RadiusConfig(eps_max=0.4, steps=8, strategy=strategy)
    result = largest_certified_radius(graph, image, prop, pixels, config, BabConfig(max_boxes=64))
    assert result.certified_at_zero
    assert 0.045 <= result.certified_eps <= 0.05
    assert result.falsified_eps is not None and result.falsified_eps > 0.05
    # What the search claims holds when checked directly.
    box = config.box(result.certified_eps)
    assert certify_boxes(graph, image, prop, pixels, [box])[0].status is Status.CERTIFIED


def test_brightness_only_radius():
    """contrast_scale 0: boxes a = 1, b in [-eps, eps]; deviation 8 |b| px, delta 0.6 -> 0.075."""
    graph = _brightness_follower()
    pixels = PixelMap.for_image(2, 16, 16)
    image = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    prop = KeypointProperty(nominal_pixels(graph, image, pixels), 0.6)
    config = RadiusConfig(eps_max=0.4, contrast_scale=0.0)
    result = largest_certified_radius(graph, image, prop, pixels, config, BabConfig(max_boxes=64))
    assert 0.07 <= result.certified_eps <= 0.075
    assert config.box(result.certified_eps).a_lo == config.box(result.certified_eps).a_hi == 1.0


def test_region_map_marks_the_cells_near_nominal():
    graph = _brightness_follower()
    pixels = PixelMap.for_image(2, 16, 16)
    image = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    ref = nominal_pixels(graph, image, pixels)
    rmap = region_map(graph, image, KeypointProperty(ref, 0.6), pixels,
                      PhotometricBox(0.8, 1.2, -0.2, 0.2), (4, 4), BabConfig(max_boxes=256))
    assert rmap.status.shape == (4, 4)
    # Cells far from (1, 0) move the keypoints by more than delta: falsified.
    assert rmap.status[0, 0] == "falsified" and rmap.status[3, 3] == "falsified"
    assert (rmap.status != "certified").sum() >= 12


def _small_cnn(seed: int = 0, device: str = "cpu"):
    from usn_offline.models import build_model, model_config_for

    torch.manual_seed(seed)
    model = build_model(model_config_for("cnn7", widths=(4, 4, 4, 8, 8), hidden=16)).eval()
    graph = lower(model, (1, 64, 64), device=device)
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    pixels = PixelMap.for_image(4, 64, 64, device=device)
    return graph, image, pixels, nominal_pixels(graph, image, pixels)


def _worst_deviation(graph, image, prop, pixels, box, n=41):
    from usn_offline.certify import Boxes
    from usn_offline.certify.falsify import pgd_attack

    a, b = np.meshgrid(np.linspace(box.a_lo, box.a_hi, n), np.linspace(box.b_lo, box.b_hi, n))
    at = torch.tensor(a.ravel(), dtype=torch.float64, device=image.device)
    bt = torch.tensor(b.ravel(), dtype=torch.float64, device=image.device)
    with torch.no_grad():
        grid = prop.deviation(pixels(graph.evaluate(image, at, bt))).max()
    boxes = Boxes.from_boxes([box], device=image.device)
    return max(float(grid), float(pgd_attack(graph, image, prop, pixels, boxes, 16, 20)[2][0]))


def test_certified_and_open_leaves_tile_the_root(device):
    graph, image, pixels, ref = _small_cnn(device=device)
    root = PhotometricBox(0.7, 1.3, -0.3, 0.3)
    prop = KeypointProperty(ref, 1e9)
    prop = KeypointProperty(ref, 1.5 * _worst_deviation(graph, image, prop, pixels, root))
    certified_area = []
    for budget in (6, 40):
        out = certify_boxes(graph, image, prop, pixels, [root], BabConfig(max_boxes=budget))[0]
        certified_area.append(sum((b.a_hi - b.a_lo) * (b.b_hi - b.b_lo) for b in out.certified_leaves))
        leaves = out.certified_leaves + out.open_leaves
        assert out.status is not Status.FALSIFIED
        assert (out.status is Status.CERTIFIED) == (not out.open_leaves)
        area = sum((b.a_hi - b.a_lo) * (b.b_hi - b.b_lo) for b in leaves)
        assert abs(area - 0.6 * 0.6) < 1e-12
        assert all(inside(b, root) for b in leaves)
    assert certified_area[1] > 0 and certified_area[0] <= certified_area[1]  # more budget, more proved


def test_radius_search_resuming_from_open_leaves_stays_sound(device):
    """Bisection probes continue from the unresolved sub-boxes of the failed probe; what the
    search then claims must survive dense sampling and PGD."""
    for seed in (0, 1):
        graph, image, pixels, ref = _small_cnn(seed, device)
        prop = KeypointProperty(ref, 1e9)
        prop = KeypointProperty(ref, 0.5 * _worst_deviation(graph, image, prop, pixels,
                                                             PhotometricBox.symmetric(0.2, 0.2)))
        config = RadiusConfig(eps_max=0.4, steps=5, strategy="bisection")
        result = largest_certified_radius(graph, image, prop, pixels, config, BabConfig(max_boxes=24))
        assert any(status == "not_certified" for _, status in result.probes)  # a probe did resume
        assert result.certified_eps > 0
        box = config.box(result.certified_eps)
        assert _worst_deviation(graph, image, prop, pixels, box) <= prop.delta


def test_frontier_radius_grows_with_the_budget_and_stays_sound(device):
    """The frontier search spends each box on the nearest unproven sub-box, so a larger budget
    continues the same refinement (the radius never shrinks); each claimed box must survive
    dense sampling and PGD."""
    for seed in (0, 1):
        graph, image, pixels, ref = _small_cnn(seed, device)
        prop = KeypointProperty(ref, 1e9)
        prop = KeypointProperty(ref, 0.5 * _worst_deviation(graph, image, prop, pixels,
                                                             PhotometricBox.symmetric(0.2, 0.2)))
        radii = []
        for budget in (4, 16, 64):
            config = RadiusConfig(eps_max=0.4, max_boxes=budget)
            result = largest_certified_radius(graph, image, prop, pixels, config, BabConfig())
            assert result.boxes_bounded <= budget + 1  # + the nominal point
            radii.append(result.certified_eps)
            if result.certified_eps > 0:
                assert _worst_deviation(graph, image, prop, pixels, config.box(result.certified_eps)) <= prop.delta
        assert radii == sorted(radii) and radii[-1] > radii[0]


def test_distance_to_nominal():
    config = RadiusConfig(contrast_scale=1.0, brightness_scale=0.5)
    assert config.distance(PhotometricBox(0.9, 1.1, -0.1, 0.1)) == 0.0
    assert config.distance(PhotometricBox(1.1, 1.2, -0.1, 0.1)) == pytest.approx(0.1)
    assert config.distance(PhotometricBox(1.0, 1.2, 0.1, 0.3)) == pytest.approx(0.2)  # b 0.1 / scale 0.5
    assert config.eps_of(0.95, -0.05) == pytest.approx(0.1)
    flat = RadiusConfig(contrast_scale=0.0)
    assert flat.distance(PhotometricBox(1.05, 1.1, -0.1, 0.1)) == float("inf")
    assert flat.eps_of(1.0, 0.2) == pytest.approx(0.2)


def test_intersect_keeps_degenerate_targets_and_drops_shared_edges():
    assert intersect(PhotometricBox(1, 1, -0.2, 0.2), PhotometricBox(1, 1, -0.1, 0.1)) == \
        PhotometricBox(1, 1, -0.1, 0.1)
    assert intersect(PhotometricBox(1.1, 1.2, -0.1, 0.1), PhotometricBox(0.9, 1.1, -0.1, 0.1)) is None
    assert intersect(PhotometricBox(1.2, 1.3, -0.1, 0.1), PhotometricBox(0.9, 1.1, -0.1, 0.1)) is None
    assert intersect(PhotometricBox(1.0, 1.3, 0.0, 0.3), PhotometricBox(0.9, 1.1, -0.1, 0.1)) == \
        PhotometricBox(1.0, 1.1, 0.0, 0.1)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"strategy": "grid"}, "radius strategy must be one of frontier, bisection"),
    ({"max_boxes": -1}, "radius search budget must be >= 1 box"),
    ({"contrast_scale": 0.0, "brightness_scale": 0.0}, "cannot both be 0"),
])
def test_radius_config_errors(kwargs, fragment):
    from usn_offline.certify.errors import CertificationError

    with pytest.raises(CertificationError, match=fragment):
        RadiusConfig(**kwargs)
