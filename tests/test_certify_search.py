"""Radius search and region maps: the search only proves what its probes proved."""

import numpy as np
import torch
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
from usn_offline.certify.search import ring
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


def test_radius_of_a_known_function():
    graph = _brightness_follower()
    pixels = PixelMap.for_image(2, 16, 16)
    image = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    ref = pixels(graph.evaluate(image, one, zero))[0]
    # Deviation at eps: 8 px * (0.5 * eps + eps) = 12 eps px; delta = 0.6 px -> true radius 0.05.
    prop = KeypointProperty(ref, 0.6)
    result = largest_certified_radius(graph, image, prop, pixels, RadiusConfig(eps_max=0.4, steps=8),
                                      BabConfig(max_boxes=64))
    assert result.certified_at_zero
    assert 0.045 <= result.certified_eps <= 0.05
    assert result.falsified_eps is not None and result.falsified_eps > 0.05
    # What the search claims holds when checked directly.
    box = RadiusConfig().box(result.certified_eps)
    assert certify_boxes(graph, image, prop, pixels, [box])[0].status is Status.CERTIFIED


def test_region_map_marks_the_cells_near_nominal():
    graph = _brightness_follower()
    pixels = PixelMap.for_image(2, 16, 16)
    image = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    ref = pixels(graph.evaluate(image, one, zero))[0]
    rmap = region_map(graph, image, KeypointProperty(ref, 0.6), pixels,
                      PhotometricBox(0.8, 1.2, -0.2, 0.2), (4, 4), BabConfig(max_boxes=256))
    assert rmap.status.shape == (4, 4)
    # Cells far from (1, 0) move the keypoints by more than delta: falsified.
    assert rmap.status[0, 0] == "falsified" and rmap.status[3, 3] == "falsified"
    assert (rmap.status != "certified").sum() >= 12
