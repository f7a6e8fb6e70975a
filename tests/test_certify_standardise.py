"""Input standardisation (``input_norm="standardise"``): lowered exactly (torch and ONNX),
bounded soundly through clipping for images and for frames' pixel sets (dense grids,
random members, PGD), exactly invariant where nothing clips, and refused where the engine
cannot represent it."""

import numpy as np
import pytest
import torch
from certify_helpers import random_model, sample_image  # noqa: E402  (tests/certify_helpers.py)
from torch import nn

from usn_offline.certify import BabConfig, Boxes, KeypointProperty, Method, PixelMap, Status, certify_boxes, lower
from usn_offline.certify.bounds import BoundOptions, output_bounds
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.falsify import pgd_attack
from usn_offline.certify.frame import inverse_box, pixel_set
from usn_offline.certify.onnx_lowering import lower_onnx
from usn_offline.certify.standardise import Standardise, body_of, clip_level_sets, standardised_sets
from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.preprocess import PreprocessConfig

SIZE = 16
GOAL = PhotometricBox(0.75, 1.33, -0.15, 0.15)


def _model(family: str, seed: int) -> nn.Module:
    return random_model(family, seed, SIZE, input_norm="standardise")


def _grid(box: PhotometricBox, n: int, rng: np.random.Generator, extra: int = 100):
    ga, gb = np.meshgrid(np.linspace(box.a_lo, box.a_hi, n), np.linspace(box.b_lo, box.b_hi, n))
    a = np.concatenate([ga.ravel(), rng.uniform(box.a_lo, box.a_hi, extra)])
    b = np.concatenate([gb.ravel(), rng.uniform(box.b_lo, box.b_hi, extra)])
    return torch.tensor(a), torch.tensor(b)


def _boxes(rng: np.random.Generator) -> list[PhotometricBox]:
    boxes = [GOAL, PhotometricBox(1.2, 1.33, 0.1, 0.15), PhotometricBox(0.97, 1.03, -0.03, 0.03)]
    for _ in range(3):
        a0, b0 = rng.uniform(0.6, 1.4), rng.uniform(-0.25, 0.25)
        ea, eb = rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.1)
        boxes.append(PhotometricBox(a0 - ea, a0 + ea, b0 - eb, b0 + eb))
    return boxes


def test_lowering_is_exact_and_standardises_the_clipped_image():
    for family in ("cnn7", "resnet"):
        model = _model(family, 3)
        graph = lower(model, (1, SIZE, SIZE))
        assert graph.standardise == Standardise(model.standardise.eps, clip=True)
        assert not any(n.name.startswith("clip") for n in graph.nodes)  # the clip is inside the step
        image = sample_image(3, SIZE)
        a, b = torch.tensor([0.5, 1.0, 1.7, 1.33]).double(), torch.tensor([0.3, 0.0, -0.4, 0.15]).double()
        x = (image * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1)).clamp(0, 1)
        with torch.no_grad():
            torch.testing.assert_close(graph.evaluate(image, a, b), model.double()(x), atol=1e-10, rtol=1e-10)
        unclipped = lower(model.float(), (1, SIZE, SIZE), clip=False)
        with torch.no_grad():
            y = image * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1)
            torch.testing.assert_close(unclipped.evaluate(image, a, b), model.double()(y), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
@pytest.mark.parametrize("clip", [True, False])
def test_bounds_contain_grid_random_and_attack_points(family, clip):
    rng = np.random.default_rng(0)
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    for seed in range(2):
        graph = lower(_model(family, seed), (1, SIZE, SIZE), clip=clip)
        image = sample_image(seed, SIZE)  # black and white corners: pixels clip both ways
        boxes = _boxes(rng)
        batch = Boxes.from_boxes(boxes)
        for method, intermediate in ((Method.IBP, "forward"), (Method.CROWN, "forward"), (Method.CROWN, "crown"),
                                     (Method.ALPHA_CROWN, "auto")):
            lo, hi = output_bounds(graph, image, batch, pixels, method,
                                   BoundOptions(intermediate=intermediate, alpha_steps=5))
            assert torch.isfinite(lo).all() and torch.isfinite(hi).all()
            for k, box in enumerate(boxes):
                a, b = _grid(box, 21, rng)
                with torch.no_grad():
                    px = pixels(graph.evaluate(image, a, b))
                assert (px >= lo[k]).all() and (px <= hi[k]).all(), (family, clip, method, seed, box)
                for sign in (1.0, -1.0):  # push every coordinate's bound from inside
                    prop = KeypointProperty((lo[k] if sign > 0 else hi[k]).clone(), 0.0)
                    pa, pb, _ = pgd_attack(graph, image, prop, pixels, Boxes.from_boxes([box]), 6, 12)
                    with torch.no_grad():
                        p = pixels(graph.evaluate(image, pa, pb))
                    assert (p >= lo[k]).all() and (p <= hi[k]).all()


def test_exactly_invariant_where_no_pixel_clips():
    """Mid-grey image, +-10 % box: nothing clips, so the bounds collapse to the nominal
    output (up to eps and rounding) although the box is wide."""
    torch.manual_seed(0)
    image = 0.35 + 0.3 * torch.rand(1, 1, SIZE, SIZE, dtype=torch.float64)
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    graph = lower(_model("cnn7", 1), (1, SIZE, SIZE))
    lo, hi = output_bounds(graph, image, Boxes.from_boxes([PhotometricBox.symmetric(0.1, 0.1)]), pixels)
    assert float((hi - lo).max()) < 1e-4
    plain = lower(random_model("cnn7", 1, SIZE), (1, SIZE, SIZE))  # the same weights, no standardisation
    lo_p, hi_p = output_bounds(plain, image, Boxes.from_boxes([PhotometricBox.symmetric(0.1, 0.1)]), pixels)
    assert float((hi_p - lo_p).max()) > 100 * float((hi - lo).max())


def test_pixel_sets_of_frames_are_bounded_soundly():
    """A frame's pixel set (per-frame proofs) through the standardisation: members with
    random (a, b) in the box and random c in [c_lo, c_hi] per pixel stay inside."""
    rng = np.random.default_rng(2)
    pre = PreprocessConfig(SIZE, SIZE)
    graph = lower(_model("cnn7", 4), (1, SIZE, SIZE))
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    for lighting in (PhotometricBox(0.97, 1.03, -0.03, 0.03), PhotometricBox(0.8, 1.2, -0.1, 0.1)):
        frame = (rng.random((40, 48)) * 255).round().astype(np.uint8)
        frame[:10, :10], frame[-8:, -12:] = 0, 255  # clipped both ways
        inverse = inverse_box(lighting)
        planes = torch.from_numpy(pixel_set(frame, pre, inverse))[None]
        lo, hi = output_bounds(graph, planes, Boxes.from_boxes([inverse]), pixels)
        n = 400
        a = torch.tensor(rng.uniform(inverse.a_lo, inverse.a_hi, n))
        b = torch.tensor(rng.uniform(inverse.b_lo, inverse.b_hi, n))
        fill = torch.tensor(rng.random((n, 1, SIZE, SIZE)))
        fill[:100] = fill[:100].round()  # the set's corners
        with torch.no_grad():
            px = pixels(graph.evaluate(planes, a, b, fill=fill))
        assert (px >= lo[0]).all() and (px <= hi[0]).all()


def _true_parameters(image, a, b, eps=1e-6):
    """A, B, g_H, g_L and z of the standardised clip(a x + b) at points (a, b) (N,)."""
    lin = image * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1)
    x = lin.clamp(0, 1)
    z = Standardise(eps).apply(x)[:, 0]
    big_a = a / torch.sqrt(x.var(dim=(2, 3), unbiased=False).view(-1) + eps)
    big_b = -big_a * ((x - lin) / a.view(-1, 1, 1, 1)).mean(dim=(1, 2, 3))
    m0 = image.mean()
    g_hi = big_a * ((1 - b) / a - m0) + big_b
    g_lo = big_a * (-b / a - m0) + big_b
    return big_a, big_b, g_hi, g_lo, z


def test_clip_level_sets_hold_every_standardised_input():
    """Every standardised clip(a x + b) of a box is a member of its clip-level set: the true
    A, B, g_H, g_L lie in the box's four intervals and each pixel's rest in [c_lo, c_hi]."""
    rng = np.random.default_rng(4)
    image = sample_image(8, SIZE)
    for box in _boxes(rng) + [PhotometricBox(1.30, 1.33, 0.12, 0.15), PhotometricBox(0.75, 0.78, -0.15, -0.12)]:
        sets, sb = clip_level_sets(Standardise(1e-6), image, Boxes.from_boxes([box]))
        x_plane, m_plane, c_lo, c_hi, bright, dark = sets[0]
        a, b = _grid(box, 15, rng)
        big_a, big_b, g_hi, g_lo, z = _true_parameters(image, a, b)
        for value, lo, hi in ((big_a, sb.a_lo, sb.a_hi), (big_b, sb.b_lo, sb.b_hi),
                              (g_hi, sb.extra_lo[:, 0], sb.extra_hi[:, 0]),
                              (g_lo, sb.extra_lo[:, 1], sb.extra_hi[:, 1])):
            assert (value >= lo).all() and (value <= hi).all(), box
        rest = z - (big_a.view(-1, 1, 1) * x_plane + big_b.view(-1, 1, 1) * m_plane
                    + g_hi.view(-1, 1, 1) * bright + g_lo.view(-1, 1, 1) * dark)
        assert (rest >= c_lo).all() and (rest <= c_hi).all(), box


def test_set_members_cover_the_standardised_inputs():
    """The (A, B, v) set of frames' pixel sets, on plain images: every standardised
    clip(a x + b) of the box is one of its members (the A d + B part at that point's A, B)."""
    rng = np.random.default_rng(3)
    image = sample_image(7, SIZE)
    step = Standardise(1e-6)
    for box in _boxes(rng):
        sets, set_boxes = standardised_sets(step, image, Boxes.from_boxes([box]))
        d, _, v_lo, v_hi = sets[0]
        a, b = _grid(box, 15, rng)
        z = step.apply((image * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1)).clamp(0, 1))[:, 0]
        lin = image * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1)
        spread = torch.sqrt(lin.clamp(0, 1).var(dim=(2, 3), unbiased=False).view(-1) + 1e-6)
        big_a = a / spread
        big_b = -big_a * ((lin.clamp(0, 1) - lin) / a.view(-1, 1, 1, 1)).mean(dim=(1, 2, 3))
        assert (big_a >= set_boxes.a_lo).all() and (big_a <= set_boxes.a_hi).all()
        assert (big_b >= set_boxes.b_lo).all() and (big_b <= set_boxes.b_hi).all()
        v = z - big_a.view(-1, 1, 1) * d - big_b.view(-1, 1, 1)
        assert (v >= v_lo - 1e-12).all() and (v <= v_hi + 1e-12).all()


def test_branch_and_bound_certifies_and_falsifies_consistently():
    graph = lower(_model("cnn7", 5), (1, SIZE, SIZE))
    image = sample_image(5, SIZE)
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    one = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        ref = pixels(graph.evaluate(image, one, one - 1))[0]
    roots = [PhotometricBox(0.99, 1.01, -0.01, 0.01), GOAL]
    out = certify_boxes(graph, image, KeypointProperty(ref, 0.5), pixels, roots, BabConfig(max_boxes=64))
    assert out[0].status is Status.CERTIFIED
    for outcome, root in zip(out, roots, strict=True):
        a, b = _grid(root, 25, np.random.default_rng(0), 0)
        with torch.no_grad():
            dev = (pixels(graph.evaluate(image, a, b)) - ref).abs().max(dim=1).values
        if outcome.status is Status.CERTIFIED:
            assert float(dev.max()) <= 0.5
        if outcome.status is Status.FALSIFIED:
            ca, cb = outcome.counterexample
            with torch.no_grad():
                moved = pixels(graph.evaluate(image, torch.tensor([ca]).double(), torch.tensor([cb]).double()))
            assert float((moved[0] - ref).abs().max()) > 0.5


def test_onnx_lowering_reads_the_exported_standardisation(tmp_path):
    import warnings

    model = _model("cnn7", 6).float()
    path = tmp_path / "std.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, SIZE, SIZE),), str(path), dynamo=False, opset_version=17)
    graph = lower_onnx(path)
    assert graph.standardise is not None and graph.standardise.clip
    reference = lower(model, (1, SIZE, SIZE))
    image = sample_image(6, SIZE)
    a, b = torch.tensor([0.8, 1.3]).double(), torch.tensor([-0.1, 0.15]).double()
    with torch.no_grad():
        torch.testing.assert_close(graph.evaluate(image, a, b), reference.evaluate(image, a, b), atol=1e-5, rtol=1e-5)


class _NormLater(nn.Module):
    def __init__(self, affine: bool = False, late: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.norm = nn.InstanceNorm2d(1, affine=affine)
        self.late = late
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 4))

    def forward(self, x):
        return self.head(self.norm(self.conv(x)) if self.late else self.conv(self.norm(x)))


@pytest.mark.parametrize("affine,late", [(True, False), (False, True)])
def test_other_instance_norms_are_refused(affine, late):
    with pytest.raises(CertificationError, match="InstanceNorm"):
        lower(_NormLater(affine, late).eval(), (1, SIZE, SIZE))


def test_auto_lirpa_backend_refuses_standardisation():
    graph = lower(_model("cnn7", 0), (1, SIZE, SIZE))
    with pytest.raises(CertificationError, match="standardisation"):
        output_bounds(graph, sample_image(0, SIZE), Boxes.from_boxes([GOAL]), PixelMap.for_image(2, SIZE, SIZE),
                      options=BoundOptions(backend="auto_lirpa"))


def test_a_signed_input_is_bounded_as_a_pixel_set_and_refused_as_a_plain_image():
    """The body of a standardising network over a z0 + b (bench/certify_bench.py compares
    it with auto_LiRPA): z0 is signed, so a plain image would be bounded at the wrong
    corners; it is refused, and the pixel set (z0, 1, 0, 0) contains every sample."""
    graph = lower(_model("cnn7", 0), (1, SIZE, SIZE))
    body = body_of(graph)
    z0 = graph.standardise.apply(sample_image(0, SIZE))
    assert bool((z0 < 0).any())
    box, pixels = PhotometricBox.symmetric(0.1, 0.1), PixelMap.for_image(2, SIZE, SIZE)
    with pytest.raises(CertificationError, match=">= 0"):
        output_bounds(body, z0, Boxes.from_boxes([box]), pixels)
    planes = torch.cat([z0, torch.ones_like(z0), torch.zeros_like(z0), torch.zeros_like(z0)], dim=1)
    lo, hi = output_bounds(body, planes, Boxes.from_boxes([box]), pixels)
    a = torch.linspace(box.a_lo, box.a_hi, 11, dtype=torch.float64).repeat_interleave(11)
    b = torch.linspace(box.b_lo, box.b_hi, 11, dtype=torch.float64).repeat(11)
    with torch.no_grad():
        out = pixels(body.evaluate(z0, a, b))
    assert bool((out >= lo - 1e-9).all()) and bool((out <= hi + 1e-9).all())


def test_per_frame_proofs_of_a_standardising_onnx_model(tmp_path):
    """The node's per-frame prover on an exported standardising model: a frame that clips
    nowhere is proved at once (its standardised input is the nominal one for every
    lighting of the range); a frame with clipped pixels gets a sound answer either way."""
    import warnings

    from usn_offline.certify.frame import FrameCertifier, FrameProofConfig, _network_input

    model = _model("cnn7", 7).float()
    path = tmp_path / "std.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, SIZE, SIZE),), str(path), dynamo=False, opset_version=17)
    pre = PreprocessConfig(SIZE, SIZE)
    prover = FrameCertifier.from_onnx(path, pre,
                                      FrameProofConfig(PhotometricBox(0.9, 1.1, -0.1, 0.1), delta=0.5))
    rng = np.random.default_rng(5)
    frame = (60 + 120 * rng.random((32, 32))).round().astype(np.uint8)  # no pixel at 0 or 255
    with torch.no_grad():
        served = model.double()(torch.from_numpy(_network_input(frame / 255.0, pre))[None, None]).numpy()[0]
    proof = prover.prove(frame, served)
    assert proof.certified and proof.deviation_px < 1e-3, proof
    frame[:8, :8] = 255
    with torch.no_grad():
        served = model.double()(torch.from_numpy(_network_input(frame / 255.0, pre))[None, None]).numpy()[0]
    proof = prover.prove(frame, served)
    assert proof.status in (Status.CERTIFIED, Status.NOT_CERTIFIED, Status.FALSIFIED)
    assert proof.deviation_px > 1e-3  # the clipped pixels are not free any more


def test_trained_standardising_network_with_the_tiled_bound_loss(tiny_dataset, tmp_path):
    """A standardising CNN7 trained on the tiny dataset, then fine-tuned with the bound loss
    over random tiles of the goal box: its bounds over tiles of the goal box contain dense
    grids and PGD points on real test images, and the fine-tune narrows them."""
    from usn_offline.data import load_split
    from usn_offline.models import model_config_for
    from usn_offline.train import TrainConfig, load_checkpoint, train_model
    from usn_offline.train.bound_loss import BoundLossConfig

    train, val, test = (load_split(tiny_dataset, s) for s in ("train", "val", "test"))
    config = model_config_for("cnn7", widths=(4, 4, 8, 8, 8), hidden=32, input_norm="standardise")
    plain = tmp_path / "m.pt"
    train_model(train, val, config, TrainConfig(epochs=2, batch_size=16, device="cpu"), plain, progress=False)
    tuned = tmp_path / "b.pt"
    bound = BoundLossConfig(weight=0.1, box=PhotometricBox(0.75, 1.33, -0.15, 0.15), tiles=4, ramp_epochs=0,
                            images_per_batch=8)
    train_model(train, val, config, TrainConfig(epochs=1, batch_size=16, lr=3e-4, device="cpu", bound=bound), tuned,
                progress=False, init=plain)
    h, w = test.image_hw
    pixels = PixelMap.for_image(test.num_keypoints, h, w)
    tiles = [PhotometricBox(0.75 + i * 0.145, 0.895 + i * 0.145, -0.15 + j * 0.075, -0.075 + j * 0.075)
             for i in (0, 3) for j in (0, 3)]
    widths = {}
    rng = np.random.default_rng(6)
    for name, path in (("plain", plain), ("tuned", tuned)):
        model = load_checkpoint(path)[0].eval()
        graph = lower(model, (1, h, w))
        assert graph.standardise is not None
        total = 0.0
        for k in range(3):
            image = torch.as_tensor(test.images[k], dtype=torch.float64)[None, None]
            lo, hi = output_bounds(graph, image, Boxes.from_boxes(tiles), pixels)
            total += float((hi - lo).mean())
            for t, box in enumerate(tiles):
                a, b = _grid(box, 15, rng, 50)
                with torch.no_grad():
                    px = pixels(graph.evaluate(image, a, b))
                assert (px >= lo[t]).all() and (px <= hi[t]).all(), (name, k, box)
                prop = KeypointProperty(lo[t].clone(), 0.0)
                pa, pb, _ = pgd_attack(graph, image, prop, pixels, Boxes.from_boxes([box]), 4, 10)
                with torch.no_grad():
                    p = pixels(graph.evaluate(image, pa, pb))
                assert (p >= lo[t]).all() and (p <= hi[t]).all()
        widths[name] = total
    assert widths["tuned"] < widths["plain"], widths


def test_the_scale_interval_holds_every_spread_and_beats_the_triangle_bound():
    """The interval of A = 1 / sqrt(var(u + t) + eps / a^2) that standardised_sets_of gives
    holds A at sampled t (each t_i in its interval, a third at the ends), and is at least
    twice as narrow as the triangle-inequality interval alone (|s - s_m| <= ||t - t_m|| /
    sqrt(n)) for a set like a frame's: a few pixels free by up to half the range."""
    from usn_offline.certify.standardise import standardised_sets_of

    g = torch.Generator().manual_seed(5)
    n_side = 32
    u = 0.2 + 0.6 * torch.rand(1, 1, n_side, n_side, generator=g, dtype=torch.float64)
    free = torch.rand(1, 1, n_side, n_side, generator=g, dtype=torch.float64) < 0.03
    t_lo = torch.where(free, torch.rand(u.shape, generator=g, dtype=torch.float64), torch.zeros_like(u))
    t_hi = t_lo + torch.where(free, 0.5 * torch.rand(u.shape, generator=g, dtype=torch.float64), torch.zeros_like(u))
    t_lo, t_hi = t_lo - 1e-3, t_hi + 1e-3  # every pixel a little free (rounding)
    boxes = Boxes.from_boxes([PhotometricBox(0.9, 1.1, -0.05, 0.05)])
    eps = 1e-5
    _, set_boxes = standardised_sets_of(Standardise(eps), u, t_lo, t_hi, boxes)
    big_a_lo, big_a_hi = float(set_boxes.a_lo[0]), float(set_boxes.a_hi[0])
    pick = torch.rand(500, 1, n_side, n_side, generator=g, dtype=torch.float64)
    pick[:150] = pick[:150].round()
    y = u + t_lo + pick * (t_hi - t_lo)
    var = y.var(dim=(2, 3), unbiased=False)
    for a in (0.9, 1.0, 1.1):
        true_a = 1 / torch.sqrt(var + eps / a**2)
        assert float(true_a.min()) >= big_a_lo and float(true_a.max()) <= big_a_hi
    n = n_side * n_side
    t_mid = (t_lo + t_hi) / 2
    centred = u - u.mean() + t_mid - t_mid.mean()
    radius = float(((t_hi - t_lo) / 2).pow(2).sum().sqrt())
    s_mid = float(centred.pow(2).sum().sqrt())
    triangle = (1 / np.sqrt(((s_mid - radius) / np.sqrt(n)) ** 2 + eps / 1.1**2)
                - 1 / np.sqrt(((s_mid + radius) / np.sqrt(n)) ** 2 + eps / 0.9**2))
    assert big_a_hi - big_a_lo < 0.5 * triangle


def test_the_shared_scale_carries_the_hidden_offsets_midpoint():
    """standardised_sets_of writes z = A (d + t_mid) + B + v with v = A (t - t_mid): every
    standardised input of the set is a member with its own A and B (checked exactly at
    sampled t and (a, b)), and v's intervals are never wider than A [t_lo, t_hi]'s,
    narrower where t keeps a sign (blown pixels: t ~ 1; a black pixel's t straddles 0)."""
    from usn_offline.certify.standardise import _interval_product, standardised_sets_of

    g = torch.Generator().manual_seed(9)
    n_side = 24
    u = 0.2 + 0.6 * torch.rand(1, 1, n_side, n_side, generator=g, dtype=torch.float64)
    kind = torch.rand(u.shape, generator=g, dtype=torch.float64)
    width = 0.3 * torch.rand(u.shape, generator=g, dtype=torch.float64)
    t_lo = torch.where(kind < 0.05, 1.0, torch.where(kind < 0.1, -width, 0.0))  # blown, black, inside
    t_hi = torch.where(kind < 0.05, 1.0 + width, torch.where(kind < 0.1, 0.0, 0.0))
    t_lo, t_hi = t_lo - 1e-4, t_hi + 1e-4
    box = PhotometricBox(0.8, 1.25, -0.1, 0.1)
    eps = 1e-5
    planes, set_boxes = standardised_sets_of(Standardise(eps), u, t_lo, t_hi, Boxes.from_boxes([box]))
    d_plane, v_lo, v_hi = planes[0, 0], planes[0, 2], planes[0, 3]
    old_lo, old_hi = _interval_product(t_lo, t_hi, set_boxes.a_lo.view(-1, 1, 1, 1), set_boxes.a_hi.view(-1, 1, 1, 1))
    new_width, old_width = v_hi - v_lo, (old_hi - old_lo)[0, 0]
    assert (new_width <= old_width + 1e-8).all()
    blown = kind[0, 0] < 0.05
    assert blown.sum() > 10 and (new_width[blown] < old_width[blown] - 1e-3).all()
    pick = torch.rand(300, 1, n_side, n_side, generator=g, dtype=torch.float64)
    pick[:100] = pick[:100].round()
    t = t_lo + pick * (t_hi - t_lo)
    a = box.a_lo + (box.a_hi - box.a_lo) * torch.rand(300, 1, 1, 1, generator=g, dtype=torch.float64)
    b = box.b_lo + (box.b_hi - box.b_lo) * torch.rand(300, 1, 1, 1, generator=g, dtype=torch.float64)
    z = Standardise(eps).apply(a * (u + t) + b)
    y = u + t
    big_a = 1 / torch.sqrt(y.var(dim=(2, 3), unbiased=False, keepdim=True) + eps / a**2)
    big_b = -big_a * t.mean(dim=(2, 3), keepdim=True)
    assert (big_a >= set_boxes.a_lo).all() and (big_a <= set_boxes.a_hi).all()
    assert (big_b >= set_boxes.b_lo).all() and (big_b <= set_boxes.b_hi).all()
    free = z - big_a * d_plane - big_b
    assert (free >= v_lo - 1e-9).all() and (free <= v_hi + 1e-9).all()
