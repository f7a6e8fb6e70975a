"""Bound-based training: the differentiable bounds are the engine's bounds (sound), their
gradients match finite differences, and training with them makes the bounds narrower."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from certify_helpers import random_model, sample_image  # noqa: E402  (tests/certify_helpers.py)

from usn_offline.certify import Boxes, lower
from usn_offline.certify.forward import propagate
from usn_offline.certify.standardise import bound_inputs
from usn_offline.errors import ConfigError
from usn_offline.perturb import PhotometricBox
from usn_offline.train.bound_loss import (
    BoundLossConfig,
    bound_loss,
    frame_set_bounds,
    frame_set_loss,
    frame_sets_of,
    keypoint_bounds,
)


def _images(n: int = 3) -> torch.Tensor:
    return torch.cat([sample_image(seed) for seed in range(n)])


@pytest.mark.parametrize("input_norm", ["none", "standardise"])
@pytest.mark.parametrize("family", ["cnn7", "resnet"])
def test_differentiable_bounds_are_the_engines_and_sound(family, input_norm):
    model = random_model(family, 11, input_norm=input_norm).double()
    images = _images()
    lo, hi = keypoint_bounds(model, images, 0.05)
    graph = lower(model, (1, 16, 16))  # the certification lowering (checked against the module)
    boxes = Boxes.from_boxes([PhotometricBox.symmetric(0.05, 0.05)] * len(images))
    fwd = propagate(*bound_inputs(graph, images, boxes), linear=True, intersect_ibp=True)
    torch.testing.assert_close(lo.detach(), fwd.out_lo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hi.detach(), fwd.out_hi, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(0)
    a = 0.95 + 0.1 * torch.rand(200, generator=g, dtype=torch.float64)
    b = -0.05 + 0.1 * torch.rand(200, generator=g, dtype=torch.float64)
    a[:4], b[:4] = torch.tensor([0.95, 0.95, 1.05, 1.05]), torch.tensor([-0.05, 0.05, -0.05, 0.05])
    for i in range(len(images)):
        with torch.no_grad():
            out = graph.evaluate(images[i:i + 1], a, b)
        assert (out >= lo[i].detach() - 1e-9).all() and (out <= hi[i].detach() + 1e-9).all()


@pytest.mark.parametrize("input_norm", ["none", "standardise"])
def test_bound_loss_gradient_matches_finite_differences(input_norm):
    torch.manual_seed(0)
    model = random_model("cnn7", 12, input_norm=input_norm).double()
    images = _images(2)
    # The standardising network over tiles of the goal box (how it is trained), the plain one over +-5 %.
    tiles = [PhotometricBox(1.2, 1.33, 0.1, 0.15), PhotometricBox(0.75, 0.8, -0.15, -0.1)]
    boxes = 0.05 if input_norm == "none" else tiles
    _check_gradients(model, lambda: bound_loss(model, images, boxes), per_parameter=3, seed=0)


def _check_gradients(model, loss_of, per_parameter: int, seed: int) -> None:
    """Autograd's gradient of ``loss_of()`` against central finite differences on
    ``per_parameter`` random entries of every parameter (at least 10 in all)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_of(), list(params.values()))
    rng = np.random.default_rng(seed)
    checked = 0
    for (name, param), grad in zip(params.items(), grads, strict=True):
        flat = param.detach().view(-1)
        for j in rng.choice(flat.numel(), size=min(per_parameter, flat.numel()), replace=False):
            h = 1e-6
            with torch.no_grad():
                old = float(flat[j])
                flat[j] = old + h
                up = float(loss_of())
                flat[j] = old - h
                down = float(loss_of())
                flat[j] = old
            numeric = (up - down) / (2 * h)
            assert float(grad.view(-1)[j]) == pytest.approx(numeric, rel=1e-4, abs=1e-7), (name, j)
            checked += 1
    assert checked >= 10


def test_schedule_and_config_errors():
    config = BoundLossConfig(weight=0.5, eps=0.1, ramp_epochs=4)
    assert config.schedule(0) == pytest.approx((0.125, 0.025))
    assert config.schedule(3) == pytest.approx((0.5, 0.1)) and config.schedule(9) == pytest.approx((0.5, 0.1))
    assert BoundLossConfig(weight=1.0, ramp_epochs=0).schedule(0) == (1.0, 0.05)
    for bad, message in (({"weight": float("nan")}, "weight"), ({"eps": 0.0}, "eps"), ({"ramp_epochs": -1}, "ramp")):
        with pytest.raises(ConfigError, match=message):
            BoundLossConfig(**bad)


def test_training_tiles_cover_the_ramped_box_and_are_reproducible():
    config = BoundLossConfig(weight=1.0, eps=0.1, ramp_epochs=2, box=PhotometricBox(0.75, 1.33, -0.15, 0.15), tiles=4)
    gen = torch.Generator().manual_seed(0)
    late = config.training_boxes(5, 64, gen)
    assert all(0.75 - 1e-12 <= b.a_lo < b.a_hi <= 1.33 + 1e-12 and -0.15 - 1e-12 <= b.b_lo < b.b_hi <= 0.15 + 1e-12
               for b in late)
    assert {round(b.a_hi - b.a_lo, 9) for b in late} == {round(0.58 / 4, 9)}
    assert len({(b.a_lo, b.b_lo) for b in late}) > 8  # tiles vary
    early = config.training_boxes(0, 64, torch.Generator().manual_seed(0))  # half-way up the ramp
    assert all(b.a_lo >= 0.875 - 1e-12 and b.a_hi <= 1.165 + 1e-12 for b in early)
    assert late == config.training_boxes(5, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError):
        BoundLossConfig(box=PhotometricBox(1.1, 1.3, -0.1, 0.1))  # must hold (1, 0)


GOAL = PhotometricBox(0.75, 1.33, -0.15, 0.15)


@pytest.mark.parametrize("input_norm", ["none", "standardise"])
def test_frame_set_bounds_are_the_proofs_and_sound(input_norm):
    """The training bounds over frame pixel sets are the engine's forward bounds over the
    sets the per-frame proof bounds (FramePixelSets.bound_inputs), and hold the nominal
    images each frame can come from over its tile (sampled, one hidden value per input pixel)."""
    model = random_model("cnn7", 13, input_norm=input_norm).double()
    images = _images(4)
    # Grey levels away from 0 and 1 but for the black and white corners: frames of them
    # arise at a good share of each tile's points.
    images = torch.where((images == 0) | (images == 1), images, 0.1 + 0.8 * images)
    sets, boxes = frame_sets_of(images, GOAL, 4, torch.Generator().manual_seed(0))
    assert all(float(f.dark.sum() + f.bright.sum()) > 0 for f in sets)  # the sample images clip
    lo, hi = frame_set_bounds(model, sets, boxes)
    graph = lower(model, (1, 16, 16))
    g = torch.Generator().manual_seed(1)
    for i, frame_sets in enumerate(sets):
        box = boxes.select(torch.tensor([i]))
        fwd = propagate(*frame_sets.bound_inputs(graph, box), linear=True, intersect_ibp=True)
        torch.testing.assert_close(lo[i:i + 1].detach(), fwd.out_lo, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hi[i:i + 1].detach(), fwd.out_hi, rtol=1e-10, atol=1e-10)
        n = 200
        a = box.a_lo + (box.a_hi - box.a_lo) * torch.rand(n, generator=g, dtype=torch.float64)
        b = box.b_lo + (box.b_hi - box.b_lo) * torch.rand(n, generator=g, dtype=torch.float64)
        hidden = torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64)
        view = (-1, 1, 1, 1)
        a, b = a.view(view), b.view(view)
        lowest = torch.clamp(a + b, max=1.0)
        net = (a * frame_sets.value + b * frame_sets.inside + frame_sets.dark * hidden * b.clamp(min=0)
               + frame_sets.bright * (lowest + hidden * (1 - lowest)))
        # Only the points the frame can arise at: its unclipped pixels invert into [0, 1]
        # (frame and input have the same size here: an input pixel is a frame pixel).
        inverted = a * frame_sets.value + b * frame_sets.inside
        ok = ((inverted >= -1e-12) & (inverted <= frame_sets.inside + 1e-12)).flatten(1).all(1)
        has_dark, has_bright = bool(frame_sets.dark.any()), bool(frame_sets.bright.any())
        ok &= ((b >= 0) | (not has_dark)).flatten() & ((a + b <= 1) | (not has_bright)).flatten()  # clipped ones
        with torch.no_grad():
            out = model(net[ok])
        assert ok.sum() > 20
        assert (out >= lo[i].detach() - 1e-9).all() and (out <= hi[i].detach() + 1e-9).all()


def test_frame_set_loss_gradient_matches_finite_differences():
    model = random_model("cnn7", 14, input_norm="standardise").double()
    sets, boxes = frame_sets_of(_images(2), GOAL, 4, torch.Generator().manual_seed(2))
    _check_gradients(model, lambda: frame_set_loss(model, sets, boxes), per_parameter=2, seed=1)


def test_the_loss_term_mixes_frame_sets_and_boxes():
    model = random_model("cnn7", 15, input_norm="standardise").double()
    images = _images(4)

    def term(share: float) -> torch.Tensor:
        config = BoundLossConfig(weight=0.5, ramp_epochs=0, box=GOAL, tiles=4, frame_sets=share)
        return config.term(model, images, 0, torch.Generator().manual_seed(3))

    boxes_only = BoundLossConfig(weight=0.5, ramp_epochs=0, box=GOAL, tiles=4).training_boxes(
        0, 4, torch.Generator().manual_seed(3))
    want = 0.5 * bound_loss(model, images, boxes_only).detach().item()
    assert term(0.0).detach().item() == pytest.approx(want, rel=1e-12)
    sets, boxes = frame_sets_of(images, GOAL, 4, torch.Generator().manual_seed(3))
    want = 0.5 * frame_set_loss(model, sets, boxes).detach().item()
    assert term(1.0).detach().item() == pytest.approx(want, rel=1e-12)
    assert term(0.5).detach().item() > 0 and term(0.5).requires_grad
    for bad in ({"frame_sets": 1.5}, {"frame_sets": -0.1}, {"frame_tiles": 0}):
        with pytest.raises(ConfigError, match="frame"):
            BoundLossConfig(**bad)


def test_fine_tuning_with_the_bound_loss_narrows_the_bounds(tiny_dataset, tmp_path):
    from usn_offline.data import load_split
    from usn_offline.models import model_config_for
    from usn_offline.train import TrainConfig, load_checkpoint, train_model

    train, val = load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val")
    config = model_config_for("cnn7", widths=(4, 8, 8, 8, 8), hidden=32)
    start = tmp_path / "start.pt"
    train_model(train, val, config, TrainConfig(epochs=2, batch_size=16, device="cpu"), start, progress=False)
    widths = {}
    for weight in (0.0, 1.0):  # the same fine-tuning from the same start, without and with the bound loss
        out = tmp_path / f"m{weight}.pt"
        train_model(train, val, config, TrainConfig(epochs=4, batch_size=16, lr=1e-3, device="cpu",
                                                    bound=BoundLossConfig(weight=weight, eps=0.05, ramp_epochs=1,
                                                                          images_per_batch=8)),
                    out, progress=False, init=start)
        model, _ = load_checkpoint(out)
        images = torch.from_numpy(val.images[:8]).unsqueeze(1)
        with torch.no_grad():
            lo, hi = keypoint_bounds(model, images, 0.05)
        widths[weight] = float((hi - lo).mean())
    assert widths[1.0] < 0.5 * widths[0.0], widths


def test_init_refuses_another_architecture(tiny_dataset, tmp_path):
    from usn_offline.data import load_split
    from usn_offline.models import model_config_for
    from usn_offline.train import TrainConfig, train_model

    train, val = load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val")
    start = tmp_path / "start.pt"
    train_model(train, val, model_config_for("cnn7", widths=(4, 8, 8, 8, 8), hidden=32),
                TrainConfig(epochs=1, batch_size=32, device="cpu"), start, progress=False)
    with pytest.raises(ConfigError, match="architecture differs"):
        train_model(train, val, model_config_for("cnn7", widths=(4, 8, 8, 8, 16), hidden=32),
                    TrainConfig(epochs=1, batch_size=32, device="cpu"), tmp_path / "other.pt", progress=False,
                    init=start)
