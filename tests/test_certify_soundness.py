"""Soundness of the certification engine: every bound contains every reachable output
(dense grids, random samples, PGD attack points), tighter methods are never looser, and
certified boxes resist a strong attack."""

import numpy as np
import pytest
import torch
from certify_helpers import nominal_pixels, random_model, sample_image  # noqa: E402  (tests/certify_helpers.py)
from torch import nn

from usn_offline.certify import (
    BabConfig,
    Boxes,
    KeypointProperty,
    Method,
    Norm,
    PixelMap,
    Status,
    certify_boxes,
    lower,
    output_bounds,
)
from usn_offline.certify.bounds import BoundOptions
from usn_offline.certify.falsify import pgd_attack
from usn_offline.perturb import PhotometricBox

SIZE = 16
METHODS = [Method.IBP, Method.CROWN, Method.ALPHA_CROWN]


def _random_model(family: str, seed: int) -> nn.Module:
    return random_model(family, seed, SIZE)


def _image(seed: int) -> torch.Tensor:
    return sample_image(seed, SIZE)


def _random_box(rng: np.random.Generator) -> PhotometricBox:
    a0, b0 = rng.uniform(0.7, 1.3), rng.uniform(-0.2, 0.2)
    ea, eb = rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.15)
    return PhotometricBox(max(0.0, a0 - ea), a0 + ea, b0 - eb, b0 + eb)


def _samples(box: PhotometricBox, n_grid: int, n_random: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    ga, gb = np.meshgrid(np.linspace(box.a_lo, box.a_hi, n_grid), np.linspace(box.b_lo, box.b_hi, n_grid))
    ra, rb = rng.uniform(box.a_lo, box.a_hi, n_random), rng.uniform(box.b_lo, box.b_hi, n_random)
    a = np.concatenate([ga.ravel(), ra])
    b = np.concatenate([gb.ravel(), rb])
    return torch.tensor(a), torch.tensor(b)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
@pytest.mark.parametrize("clip", [True, False])
def test_bounds_contain_grid_random_and_attack_points(family, clip, device):
    rng = np.random.default_rng(0)
    pixels = PixelMap.for_image(2, SIZE, SIZE, device=device)
    for seed in range(3):
        model = _random_model(family, seed)
        graph = lower(model, (1, SIZE, SIZE), clip=clip, device=device)
        image = _image(seed).to(device)
        boxes = [_random_box(rng) for _ in range(4)]
        batch = Boxes.from_boxes(boxes, device=device)
        for method in METHODS:
            opts = BoundOptions(alpha_steps=5, cut=None if seed == 0 else "auto", tighten_rows=8 * seed)
            lo, hi = output_bounds(graph, image, batch, pixels, method, opts)
            assert lo.device.type == torch.device(device).type
            for k, box in enumerate(boxes):
                a, b = (t.to(device) for t in _samples(box, 15, 200, rng))
                with torch.no_grad():
                    px = pixels(graph.evaluate(image, a, b))
                assert (px >= lo[k]).all() and (px <= hi[k]).all(), (family, method, seed, k)
                # Attack each coordinate's bound directly: push it up and down.
                for sign in (1.0, -1.0):
                    ref = lo[k] if sign > 0 else hi[k]
                    prop = KeypointProperty(ref.clone(), 0.0)
                    pa, pb, _ = pgd_attack(graph, image, prop, pixels, Boxes.from_boxes([box], device=device), 8, 15)
                    with torch.no_grad():
                        p = pixels(graph.evaluate(image, pa, pb))
                    assert (p >= lo[k]).all() and (p <= hi[k]).all()


def test_lowered_graph_matches_the_torch_model():
    for family in ("cnn7", "resnet"):
        model = _random_model(family, 5)
        graph = lower(model, (1, SIZE, SIZE))
        image = _image(5)
        a, b = torch.tensor([0.5, 1.0, 1.7]).double(), torch.tensor([0.3, 0.0, -0.4]).double()
        x = (image * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1)).clamp(0, 1)
        with torch.no_grad():
            expected = model(x.float()).double()
            got = graph.evaluate(image, a, b)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
def test_tighter_methods_are_never_looser(family):
    rng = np.random.default_rng(1)
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    model = _random_model(family, 2)
    graph = lower(model, (1, SIZE, SIZE))
    image = _image(2)
    batch = Boxes.from_boxes([_random_box(rng) for _ in range(6)])
    widths = {}
    for method in METHODS:
        lo, hi = output_bounds(graph, image, batch, pixels, method, BoundOptions(alpha_steps=10))
        widths[method] = (lo, hi)
    ibp_lo, ibp_hi = widths[Method.IBP]
    crown_lo, crown_hi = widths[Method.CROWN]
    alpha_lo, alpha_hi = widths[Method.ALPHA_CROWN]
    assert (crown_lo >= ibp_lo).all() and (crown_hi <= ibp_hi).all()
    assert (alpha_lo >= crown_lo - 1e-9).all() and (alpha_hi <= crown_hi + 1e-9).all()


def test_bounds_shrink_when_the_box_shrinks():
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    graph = lower(_random_model("cnn7", 3), (1, SIZE, SIZE))
    image = _image(3)
    rng = np.random.default_rng(3)
    for _ in range(5):
        a0, b0 = rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
        scales = (0.2, 0.1, 0.05, 0.02, 0.005, 0.0)
        nested = [PhotometricBox(a0 - s, a0 + s * 0.7, b0 - s * 0.5, b0 + s) for s in scales]
        for method in METHODS:
            lo, hi = output_bounds(graph, image, Boxes.from_boxes(nested), pixels, method,
                                   BoundOptions(alpha_steps=5))
            assert (lo[1:] >= lo[:-1] - 1e-9).all() and (hi[1:] <= hi[:-1] + 1e-9).all(), method


def test_certified_boxes_resist_a_strong_attack(device):
    pixels = PixelMap.for_image(2, SIZE, SIZE, device=device)
    certified = 0
    for seed in range(4):
        graph = lower(_random_model("cnn7", 10 + seed), (1, SIZE, SIZE), device=device)
        image = _image(seed).to(device)
        ref = nominal_pixels(graph, image, pixels)
        prop = KeypointProperty(ref, 0.05)
        boxes = [PhotometricBox.symmetric(e, e) for e in (0.01, 0.03, 0.1)]
        for box, out in zip(boxes, certify_boxes(graph, image, prop, pixels, boxes, BabConfig(max_boxes=64)),
                            strict=True):
            if out.status is not Status.CERTIFIED:
                continue
            certified += 1
            a, b, dev = pgd_attack(graph, image, prop, pixels, Boxes.from_boxes([box], device=device), 32, 30,
                                   seed=seed)
            assert dev.item() <= prop.delta
            a, b = (t.to(device) for t in _samples(box, 30, 500, np.random.default_rng(seed)))
            assert (prop.deviation(pixels(graph.evaluate(image, a, b).detach())) <= prop.delta).all()
    assert certified >= 3  # the check above must have had something to check


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_falsified_with_a_valid_counterexample(norm):
    """A network whose keypoints follow the brightness: shifting b moves them far."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 4))
    with torch.no_grad():
        model[1].weight.fill_(1.0 / (SIZE * SIZE))
        model[1].bias.zero_()
    model.eval()
    graph = lower(model, (1, SIZE, SIZE))
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    image = torch.full((1, 1, SIZE, SIZE), 0.5, dtype=torch.float64)
    ref = nominal_pixels(graph, image, pixels)
    prop = KeypointProperty(ref, 1.0, norm)
    box = PhotometricBox(0.9, 1.1, -0.3, 0.3)  # b = 0.3 moves every output by 0.3 * 8 px = 2.4 px
    out = certify_boxes(graph, image, prop, pixels, [box])[0]
    assert out.status is Status.FALSIFIED
    a, b = out.counterexample
    assert box.contains(a, b)
    x = (image * a + b).clamp(0, 1).float()
    with torch.no_grad():
        px = pixels(model(x).double())
    assert prop.deviation(px).item() > prop.delta
    assert out.counterexample_deviation > prop.delta
    # The bounds (of the exact, float64 network) cover the whole box, counterexample included.
    with torch.no_grad():
        exact = pixels(graph.evaluate(image, torch.tensor([a], dtype=torch.float64),
                                    torch.tensor([b], dtype=torch.float64)))[0]
    assert (exact.numpy() >= out.lower).all() and (exact.numpy() <= out.upper).all()


def test_small_box_of_a_smooth_model_is_certified():
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    graph = lower(_random_model("resnet", 4), (1, SIZE, SIZE))
    image = _image(4)
    ref = nominal_pixels(graph, image, pixels)
    box = PhotometricBox.symmetric(0.02, 0.02)
    out = certify_boxes(graph, image, KeypointProperty(ref, 0.5), pixels, [box])
    assert out[0].status is Status.CERTIFIED
    assert (out[0].lower <= ref.numpy()).all() and (out[0].upper >= ref.numpy()).all()


def test_float32_copy_of_the_graph_matches():
    graph = lower(_random_model("resnet", 6), (1, SIZE, SIZE))
    g32 = graph.astype(torch.float32)
    assert g32 is graph.astype(torch.float32) and graph.astype(torch.float64) is graph
    image = _image(6)
    a, b = torch.tensor([0.8, 1.2], dtype=torch.float64), torch.tensor([0.1, -0.1], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(g32.evaluate(image.float(), a.float(), b.float()).double(),
                                   graph.evaluate(image, a, b), atol=1e-5, rtol=1e-5)


def test_float32_screening_changes_speed_not_answers():
    """Screening sub-boxes in float32 only decides where to split: statuses agree with plain
    float64 branch and bound, and the reported (float64) bounds still contain every sample."""
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    rng = np.random.default_rng(7)
    for seed in range(3):
        graph = lower(_random_model("cnn7", 20 + seed), (1, SIZE, SIZE))
        image = _image(seed)
        ref = nominal_pixels(graph, image, pixels)
        prop = KeypointProperty(ref, 0.05)
        boxes = [PhotometricBox.symmetric(e, e) for e in (0.01, 0.04, 0.15)]
        plain = certify_boxes(graph, image, prop, pixels, boxes, BabConfig(max_boxes=256, screen_float32_px=None))
        screened = certify_boxes(graph, image, prop, pixels, boxes, BabConfig(max_boxes=256))
        for box, p, s in zip(boxes, plain, screened, strict=True):
            if Status.NOT_CERTIFIED not in (p.status, s.status):
                assert p.status == s.status
            a, b = _samples(box, 12, 100, rng)
            with torch.no_grad():
                px = pixels(graph.evaluate(image, a, b)).numpy()
            assert (px >= s.lower).all() and (px <= s.upper).all()


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
def test_auto_intermediate_bounds_are_crown_on_residual_networks(family):
    """'auto' means CROWN intermediate bounds where the network adds paths (forward bounds
    lose too much there) and stays forward-first elsewhere."""
    graph = lower(random_model(family, seed=5), (1, 16, 16))
    assert graph.has_residual == (family == "resnet")
    image = sample_image(5)
    boxes = Boxes.from_boxes([PhotometricBox(0.9, 1.1, -0.1, 0.1), PhotometricBox(0.98, 1.0, 0.0, 0.01)])
    pixels = PixelMap.for_image(2, 16, 16)
    auto = output_bounds(graph, image, boxes, pixels, "crown", BoundOptions(crown_max_unstable=1))
    crown = output_bounds(graph, image, boxes, pixels, "crown", BoundOptions(intermediate="crown"))
    forward = output_bounds(graph, image, boxes, pixels, "crown", BoundOptions(intermediate="forward"))
    same = all(torch.equal(x, y) for x, y in zip(auto, crown if family == "resnet" else forward, strict=True))
    assert same
    if family == "resnet":  # and CROWN is the tighter of the two there
        assert bool(((crown[1] - crown[0]) <= (forward[1] - forward[0]) + 1e-9).all())


def _cancelling_network(scale: float) -> nn.Module:
    """Two hidden units of ~scale/2 whose difference (0.3) is every output: the output is
    small, the sums behind it are not (from an adversarial review)."""
    torch.manual_seed(0)
    n = 8
    model = nn.Sequential(nn.Flatten(), nn.Linear(n * n, 2), nn.ReLU(), nn.Linear(2, 4)).double().eval()
    with torch.no_grad():
        w = torch.rand(n * n, dtype=torch.float64) / (n * n)
        model[1].weight[0] = scale * w
        model[1].weight[1] = scale * w
        model[1].bias[:] = torch.tensor([scale * 0.5 + 0.3, scale * 0.5], dtype=torch.float64)
        model[3].weight.zero_()
        model[3].bias.zero_()
        model[3].weight[:, 0], model[3].weight[:, 1] = 1.0, -1.0
    return model


@pytest.mark.parametrize("method", METHODS)
def test_large_hidden_values_that_cancel_are_bounded_soundly(method):
    """Hidden values ~5e9 lose ~6e-6 px to float64 rounding: a margin relative to the output
    alone (1e-9 of ~5 px) missed it, and a box where every point breaks delta = 1e-5 px came
    out certified. The exact output (rational arithmetic) lies within the bounds."""
    from fractions import Fraction

    model = _cancelling_network(1e10)
    graph = lower(model, (1, 8, 8))
    pixels = PixelMap.for_image(2, 8, 8)
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.8 + 0.1
    point, other = PhotometricBox(1.0, 1.0, 0.0, 0.0), PhotometricBox(0.999, 1.001, -0.001, 0.001)
    x = [Fraction(v) for v in image.flatten().tolist()]  # clip(1 x + 0) = x
    hidden = [max(sum(Fraction(wi) * xi for wi, xi in zip(row, x, strict=True)) + Fraction(bi), Fraction(0))
              for row, bi in zip(model[1].weight.tolist(), model[1].bias.tolist(), strict=True)]
    scale, offset = (float(t[0]) for t in (pixels.scale, pixels.offset))
    exact = float((hidden[0] - hidden[1]) * Fraction(scale) + Fraction(offset))
    lo, hi = output_bounds(graph, image, Boxes.from_boxes([point, other]), pixels, method)
    assert lo[0, 0] <= exact <= hi[0, 0], (lo[0, 0].item(), exact, hi[0, 0].item())
    prop = KeypointProperty(torch.full((4,), exact + 1.5e-5, dtype=torch.float64), 1e-5)  # broken by 5e-6 px
    outcome = certify_boxes(graph, image, prop, pixels, [point, other], BabConfig(max_boxes=16, batch_size=2))[0]
    assert outcome.status is not Status.CERTIFIED
