"""Per-frame proofs: the pixel set of a frame holds every nominal image it can come from,
the engine's bounds over pixel sets are sound, the ONNX lowering equals the model, and a
proof's promise holds on relit frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from certify_helpers import random_model, sample_image  # noqa: E402  (tests/certify_helpers.py)

from usn_offline.certify import Boxes, CertificationError, PixelMap, lower, output_bounds
from usn_offline.certify.bab import Status
from usn_offline.certify.bounds import BoundOptions
from usn_offline.certify.frame import FrameCertifier, FramePixelSets, FrameProofConfig, inverse_box, pixel_set
from usn_offline.certify.onnx_lowering import lower_onnx
from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.preprocess import _LUMA, PreprocessConfig, preprocess, resize_image

LIGHTING = PhotometricBox(0.8, 1.25, -0.1, 0.12)


def _nominal_input(nominal: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The network input of a float nominal image in [0, 1], in float64."""
    gray = nominal if nominal.ndim == 2 else nominal[:, :, :3] @ np.array(_LUMA[3])
    return resize_image(gray, config)


def _camera(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A nominal image with flat black and white patches (they clip first)."""
    img = rng.random(shape)
    img[: shape[0] // 4] *= 0.05
    img[-shape[0] // 4:] = 1 - 0.05 * img[-shape[0] // 4:]
    return img


def test_inverse_box_bounds_every_inverse():
    inv = inverse_box(LIGHTING)
    rng = np.random.default_rng(0)
    a0 = np.r_[rng.uniform(LIGHTING.a_lo, LIGHTING.a_hi, 500), LIGHTING.a_lo, LIGHTING.a_hi, LIGHTING.a_lo]
    b0 = np.r_[rng.uniform(LIGHTING.b_lo, LIGHTING.b_hi, 500), LIGHTING.b_hi, LIGHTING.b_lo, LIGHTING.b_lo]
    a, b = 1 / a0, -b0 / a0
    assert (a >= inv.a_lo - 1e-15).all() and (a <= inv.a_hi + 1e-15).all()
    assert (b >= inv.b_lo - 1e-15).all() and (b <= inv.b_hi + 1e-15).all()
    assert b.min() == pytest.approx(inv.b_lo) and b.max() == pytest.approx(inv.b_hi)  # tight
    with pytest.raises(CertificationError, match="contrast > 0"):
        inverse_box(PhotometricBox(0.0, 1.0, 0.0, 0.0))


@pytest.mark.parametrize("kind", ["gray8", "rgb8", "rgba8", "gray16", "float"])
@pytest.mark.parametrize("rounding", [True, False])
def test_pixel_set_holds_the_nominal_image(kind, rounding):
    """For frames made by the stated model from random nominal images, the nominal image's
    network input lies in the frame's pixel set at the true inverse (a, b); and over any box
    around that point, shrunk to where the frame can arise, the point stays and the
    (narrower) set of that box still holds the nominal image."""
    config = PreprocessConfig(input_height=12, input_width=16)
    inv = inverse_box(LIGHTING)
    rng = np.random.default_rng(1)
    channels = {"rgb8": 3, "rgba8": 4}.get(kind)
    max_value = 65535.0 if kind == "gray16" else 1.0 if kind == "float" else 255.0
    clipped = narrowed = 0
    inv_area = (inv.a_hi - inv.a_lo) * (inv.b_hi - inv.b_lo)
    for trial in range(12):
        shape = (48, 64) if channels is None else (48, 64, channels)
        nominal = _camera(rng, shape)
        if kind == "rgba8":
            nominal[:, :, 3] = 1.0
        a0, b0 = rng.uniform(LIGHTING.a_lo, LIGHTING.a_hi), rng.uniform(LIGHTING.b_lo, LIGHTING.b_hi)
        lit = np.clip(a0 * nominal + b0, 0, 1)
        if kind == "float":
            frame = lit
        elif rounding:
            frame = np.rint(lit * max_value).astype(np.uint16 if kind == "gray16" else np.uint8)
        else:  # no rounding in the model: a frame whose values are exactly representable
            frame = np.rint(lit * max_value).astype(np.uint16 if kind == "gray16" else np.uint8)
            # Rounding may put a value just beyond what a nominal image in [0, 1] gives (the
            # model has no rounding here): such pixels get a mid-grey consistent one.
            exact = frame.astype(np.float64) / max_value
            unclipped = (frame > 0) & (frame < max_value)
            beyond = unclipped & (((exact - b0) / a0 > 1) | ((exact - b0) / a0 < 0))
            frame[beyond] = np.rint((0.5 * a0 + b0) * max_value)
            exact = frame.astype(np.float64) / max_value
            dark = rng.random(shape) * max(0.0, -b0 / a0)  # a0 x + b0 <= 0
            bright = 1 - rng.random(shape) * (1 - min(1.0, (1 - b0) / a0))  # a0 x + b0 >= 1
            nominal = np.where(frame == 0, dark, np.where(frame == max_value, bright, (exact - b0) / a0))
        if kind == "rgba8":
            frame[:, :, 3] = 255
        planes = pixel_set(frame, config, inv, rounding=rounding)
        u, m, c_lo, c_hi = planes
        assert (u >= 0).all() and (m >= 0).all() and (m <= 1 + 1e-12).all() and (c_lo <= c_hi).all()
        tied = u / a0 - m * b0 / a0
        x0 = _nominal_input(nominal, config)
        assert (x0 >= tied + c_lo - 1e-9).all() and (x0 <= tied + c_hi + 1e-9).all(), (kind, trial)
        clipped += int((m < 1).any())

        sets = FramePixelSets.of_frame(frame, config, LIGHTING, rounding)
        a, b = 1 / a0, -b0 / a0
        around = PhotometricBox(a - rng.uniform(0, 0.1), a + rng.uniform(0, 0.1), b - rng.uniform(0, 0.1),
                                b + rng.uniform(0, 0.1))
        shrunk = sets.restrict(Boxes.from_boxes([around]))
        assert shrunk.a_lo[0] <= a <= shrunk.a_hi[0] and shrunk.b_lo[0] <= b <= shrunk.b_hi[0], (kind, trial)
        u, m, c_lo, c_hi = sets.for_boxes(shrunk)[0].numpy()
        assert (x0 >= a * u + b * m + c_lo - 1e-9).all() and (x0 <= a * u + b * m + c_hi + 1e-9).all()
        # The same set in the form a standardisation sees, x = a (u + t) + b: t in its bounds.
        t_lo, t_hi = (t[0, 0].numpy() for t in sets.hidden_offsets(shrunk))
        t = (x0 - b) / a - sets.value[0].numpy()
        assert (t >= t_lo - 1e-9).all() and (t <= t_hi + 1e-9).all(), (kind, trial)
        whole = sets.restrict(Boxes.from_boxes([inv]))
        narrowed += int(float((whole.a_hi - whole.a_lo) * (whole.b_hi - whole.b_lo)) < 0.9 * inv_area)
    assert clipped >= 4, "too few test frames clip"
    assert narrowed >= 6, "the frames' own pixels should rule out much of the inverse range"


def _pixel_set_of(image: torch.Tensor, seed: int) -> torch.Tensor:
    """A pixel set (1, 4, H, W) around ``image``: some pixels free in an interval (clipped),
    the rest tied with a small rounding interval."""
    g = torch.Generator().manual_seed(seed)
    free = torch.rand(image.shape, generator=g, dtype=torch.float64) < 0.2
    x = torch.where(free, torch.zeros_like(image), image)
    m = (~free).to(torch.float64)
    c_lo = torch.where(free, 0.3 * torch.rand(image.shape, generator=g, dtype=torch.float64), -0.002 * m)
    c_hi = torch.where(free, c_lo + 0.2, 0.002 * m)
    return torch.cat([x, m, c_lo, c_hi], dim=1)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
@pytest.mark.parametrize("intermediate", ["crown", "forward"])
def test_bounds_over_pixel_sets_are_sound(family, intermediate):
    graph = lower(random_model(family, 3), (1, 16, 16))
    planes = _pixel_set_of(sample_image(3), 3)
    boxes = [PhotometricBox(0.9, 1.1, -0.05, 0.05), PhotometricBox(0.7, 0.8, 0.1, 0.2)]
    pixels = PixelMap.for_image(2, 16, 16)
    lo, hi = output_bounds(graph, planes, Boxes.from_boxes(boxes), pixels,
                           options=BoundOptions(intermediate=intermediate, max_elements=4096))
    g = torch.Generator().manual_seed(4)
    for k, box in enumerate(boxes):
        n = 300
        a = box.a_lo + (box.a_hi - box.a_lo) * torch.rand(n, generator=g, dtype=torch.float64)
        b = box.b_lo + (box.b_hi - box.b_lo) * torch.rand(n, generator=g, dtype=torch.float64)
        fill = torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64)
        fill[: n // 3] = fill[: n // 3].round()  # the corners of the free intervals
        out = pixels(graph.evaluate(planes, a, b, fill))
        assert (out >= lo[k] - 1e-9).all() and (out <= hi[k] + 1e-9).all()


def _feasible_points(rng: np.random.Generator, box: PhotometricBox, frame: np.ndarray, count: int
                     ) -> list[tuple[float, float]]:
    """``count`` random (a, b) of ``box`` (the inverse form X0 = a X + b) at which the frame
    can arise: its unclipped pixels invert into [0, 1], a dark pixel needs b >= 0 and a
    bright one a + b <= 1."""
    x = frame.astype(np.float64) / 255
    dark, bright = x <= 0, x >= 1
    inside = x[~(dark | bright)]
    points = []
    for _ in range(100 * count):
        a, b = rng.uniform(box.a_lo, box.a_hi), rng.uniform(box.b_lo, box.b_hi)
        if (a * inside.min() + b >= 0 and a * inside.max() + b <= 1 and not (dark.any() and b < 0)
                and not (bright.any() and a + b > 1)):
            points.append((a, b))
            if len(points) == count:
                break
    return points


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_standardised_frame_sets_are_sound_and_tighter(family, channels):
    """A standardising network over a frame's pixel sets, bounded through
    FramePixelSets.bound_inputs (t from the set's own dependence on (a, b)): the bounds hold
    the nominal images the frame can come from, sampled pixel by pixel and attacked by
    gradient steps on the hidden values, and are narrower than standardising the planes of
    for_boxes by interval arithmetic."""
    graph = lower(random_model(family, 21, input_norm="standardise"), (1, 16, 16))
    config = PreprocessConfig(input_height=16, input_width=16)
    pixels = PixelMap.for_image(2, 16, 16)
    options = BoundOptions(intermediate="crown", max_elements=4096)
    rng = np.random.default_rng(7)
    shape = (32, 32) if channels == 1 else (32, 32, 3)
    for a0, b0 in ((1.0, 0.0), (0.85, -0.08), (1.2, 0.1)):
        frame = np.rint(255 * np.clip(a0 * _camera(rng, shape) + b0, 0, 1)).astype(np.uint8)
        x = frame.astype(np.float64) / 255
        dark, bright = x <= 0, x >= 1
        sets = FramePixelSets.of_frame(frame, config, LIGHTING)
        a, b = 1 / a0, -b0 / a0
        root = sets.restrict(Boxes.from_boxes([inverse_box(LIGHTING)]))
        sub = sets.restrict(Boxes.from_boxes([PhotometricBox(a - 0.03, a + 0.03, b - 0.02, b + 0.02)]))
        for box in (root, sub):
            lo, hi = output_bounds(*sets.bound_inputs(graph, box), pixels, options=options)
            old_lo, old_hi = output_bounds(graph, sets.for_boxes(box), box, pixels, options=options)
            assert float((hi - lo).mean()) < 0.9 * float((old_hi - old_lo).mean())
            plain = PhotometricBox(*(float(v[0]) for v in (box.a_lo, box.a_hi, box.b_lo, box.b_hi)))
            points = _feasible_points(rng, plain, frame, 24)
            assert len(points) >= 12
            sampled = []
            for pa, pb in points:  # every hidden value drawn on its own, a third at its interval's ends
                pick = rng.random(shape)
                pick = np.where(rng.random(shape) < 0.3, pick.round(), pick)
                lowest = min(pa + pb, 1.0)
                x0 = np.where(dark, pick * max(pb, 0.0), np.where(bright, lowest + pick * (1 - lowest), pa * x + pb))
                sampled.append(_nominal_input(x0, config))
            batch = torch.from_numpy(np.stack(sampled))[:, None]
            one = torch.ones(len(sampled), dtype=torch.float64)
            with torch.no_grad():
                out = pixels(graph.evaluate(batch, one, one - 1))
            assert (out >= lo - 1e-9).all() and (out <= hi + 1e-9).all()
            # Attack: one hidden value per network pixel (a subset of the set), by signed
            # gradient steps that push a random direction of the keypoints outwards.
            pa, pb = (torch.tensor([p[k] for p in points], dtype=torch.float64).view(-1, 1, 1, 1) for k in (0, 1))
            lowest = torch.clamp(pa + pb, max=1.0)
            u, m, d, br = (t[None] for t in (sets.value, sets.inside, sets.dark, sets.bright))
            hidden = torch.rand(len(points), 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            direction = torch.randn(len(points), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            for _ in range(30):
                hidden.requires_grad_(True)
                net = pa * u + pb * m + d * hidden * pb.clamp(min=0) + br * (lowest + hidden * (1 - lowest))
                keypoints = pixels(graph.evaluate(net, one, one - 1))
                assert (keypoints >= lo - 1e-9).all() and (keypoints <= hi + 1e-9).all()
                (grad,) = torch.autograd.grad((keypoints * direction).sum(), hidden)
                hidden = (hidden.detach() + 0.2 * grad.sign()).clamp(0, 1)


class _StandardisedPlanes(FramePixelSets):
    """The sets as before bound_inputs: for_boxes' planes, standardised by interval arithmetic."""

    def bound_inputs(self, graph, boxes, parts=None):
        return graph, self.for_boxes(boxes), boxes


def test_branch_and_bound_bounds_frames_through_their_sets():
    """certify_boxes hands each box to the sets' bound_inputs: with a standardising network
    the proof's bounds come out narrower than over for_boxes' planes, and still sound."""
    import dataclasses

    from usn_offline.certify.bab import BabConfig, certify_boxes
    from usn_offline.certify.spec import KeypointProperty

    graph = lower(random_model("cnn7", 22, input_norm="standardise"), (1, 16, 16))
    config = PreprocessConfig(input_height=16, input_width=16)
    pixels = PixelMap.for_image(2, 16, 16)
    frame = np.rint(255 * np.clip(0.9 * _camera(np.random.default_rng(3), (32, 32)) - 0.05, 0, 1)).astype(np.uint8)
    sets = FramePixelSets.of_frame(frame, config, LIGHTING)
    planes_only = _StandardisedPlanes(**{f.name: getattr(sets, f.name) for f in dataclasses.fields(sets)})
    inverse = inverse_box(LIGHTING)
    image = torch.from_numpy(preprocess(frame, config)).double()[None, None]
    one = torch.ones(1, dtype=torch.float64)
    reference = pixels(graph.evaluate(image, one, one - 1))[0].detach()
    prop = KeypointProperty(reference, 0.01)  # never proved: every box of the budget is bounded
    bab = BabConfig(max_boxes=7, bounds=BoundOptions(intermediate="crown"))
    roots = Boxes.from_boxes([inverse])
    new, old = (certify_boxes(graph, s_.for_boxes(s_.restrict(roots)), prop, pixels, [inverse], bab, s_)[0]
                for s_ in (sets, planes_only))
    new_width = np.asarray(new.upper) - np.asarray(new.lower)
    old_width = np.asarray(old.upper) - np.asarray(old.lower)
    assert (new_width < old_width).all()
    points = _feasible_points(np.random.default_rng(4), inverse, frame, 50)
    x = frame.astype(np.float64) / 255
    inputs = [_nominal_input(np.where(x <= 0, pb * 0.5, np.where(x >= 1, 1.0, pa * x + pb)), config)
              for pa, pb in points]
    one = torch.ones(len(inputs), dtype=torch.float64)
    with torch.no_grad():
        out = pixels(graph.evaluate(torch.from_numpy(np.stack(inputs))[:, None], one, one - 1)).numpy()
    assert (out >= np.asarray(new.lower) - 1e-9).all() and (out <= np.asarray(new.upper) + 1e-9).all()


def test_a_tied_pixel_set_bounds_like_its_image():
    graph = lower(random_model("cnn7", 5), (1, 16, 16))
    image = sample_image(5)
    tied = torch.cat([image, torch.ones_like(image), torch.zeros_like(image), torch.zeros_like(image)], dim=1)
    boxes = Boxes.from_boxes([PhotometricBox(0.9, 1.1, -0.05, 0.05)])
    pixels = PixelMap.for_image(2, 16, 16)
    for intermediate in ("crown", "forward"):
        options = BoundOptions(intermediate=intermediate, max_elements=4096)
        want = output_bounds(graph, image, boxes, pixels, options=options)
        got = output_bounds(graph, tied, boxes, pixels, options=options)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
def test_onnx_lowering_equals_the_torch_lowering(family, tmp_path):
    model = random_model(family, 6)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.float(), (torch.zeros(1, 1, 16, 16),), str(path), dynamo=False, opset_version=17,
                      do_constant_folding=True)
    from_onnx = lower_onnx(path)
    from_torch = lower(model.double(), (1, 16, 16))
    x = torch.rand(5, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = torch.tensor([1.0, 0.8, 1.2, 0.9, 1.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.1, -0.1, 0.05, 0.2], dtype=torch.float64)
    # float32 weights in the ONNX file: equal to float32 precision
    torch.testing.assert_close(from_onnx.evaluate(x, a, b), from_torch.evaluate(x, a, b), rtol=1e-5, atol=1e-5)


def test_onnx_lowering_refuses_what_it_cannot_represent(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Sigmoid(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 14 * 14, 4))
    path = tmp_path / "sigmoid.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(path), dynamo=False, opset_version=17)
    with pytest.raises(CertificationError, match="unsupported ONNX operator Sigmoid"):
        lower_onnx(path)
    dilated = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, dilation=2), torch.nn.Flatten(),
                                  torch.nn.Linear(2 * 12 * 12, 4))
    torch.onnx.export(dilated, (torch.zeros(1, 1, 16, 16),), str(path), dynamo=False, opset_version=17)
    with pytest.raises(CertificationError, match="dilation"):
        lower_onnx(path)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CertificationError, match="cannot read the ONNX model"):
        lower_onnx(tmp_path / "junk.onnx")


def _served_and_nominal(exported_bundle):
    """The bundle, its test split, and ONNX Runtime's keypoints (normalised) of a frame,
    as the node serves them."""
    import onnxruntime as ort

    from usn_offline.data import load_split
    from usn_offline.runtime.bundle import Bundle

    bundle = Bundle.load(exported_bundle)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])

    def infer(frame):
        return session.run(None, {"image": preprocess(frame, bundle.preprocess)[None, None].astype(np.float32)})[0][0]

    return bundle, load_split(exported_bundle.parent / "data", "test"), infer


def _check_promise(bundle, infer, nominal, served, proof, delta) -> None:
    """A certified frame's served keypoints are within the proven bound (<= delta) of
    those on its nominal image (network-input pixels)."""
    if proof.certified:
        h, w = bundle.preprocess.input_height, bundle.preprocess.input_width
        moved = np.abs(infer(nominal) - served) * np.tile([w / 2, h / 2], len(served) // 2)
        assert moved.max() <= proof.deviation_px + 1e-3 <= delta + 1e-3


def test_frame_proofs_keep_their_promise(exported_bundle):
    """On camera-size frames relit inside the range from the bundle's test images, every
    certified frame's served keypoints are within delta of those on its nominal image
    (both through ONNX Runtime, as the node serves them)."""
    import cv2

    bundle, test, infer = _served_and_nominal(exported_bundle)
    lighting = PhotometricBox(0.95, 1.05, -0.04, 0.04)
    delta = 4.0
    certifier = FrameCertifier.from_onnx(bundle.onnx_path, bundle.preprocess,
                                         FrameProofConfig(lighting, delta, max_boxes=8))
    rng = np.random.default_rng(7)
    outcomes = []
    for i in range(6):
        nominal = cv2.resize(test.images[i], (640, 480), interpolation=cv2.INTER_LINEAR)
        a0, b0 = rng.uniform(lighting.a_lo, lighting.a_hi), rng.uniform(lighting.b_lo, lighting.b_hi)
        frame = np.clip(a0 * nominal + b0, 0, 1)  # the stated model, exactly (float frame)
        served = infer(frame)
        proof = certifier.prove(frame, served)
        outcomes.append((proof.status, round(proof.deviation_px, 3)))
        _check_promise(bundle, infer, nominal, served, proof, delta)
    assert sum(status is Status.CERTIFIED for status, _ in outcomes) >= 3, outcomes


def test_frames_with_clipped_pixels_get_crown_bounds(exported_bundle):
    """Clipped pixels are free intervals that splitting (a, b) does not pin, and forward
    bounds over them leave many neurons unstable: the per-frame proof gives every box the
    forward bounds leave open CROWN intermediate bounds while at most 8 % of the ReLU
    neurons are unstable (the offline default, ``BabConfig()``, stops at 3,000 and leaves
    these frames at 45-200 px), and keeps the promise."""
    import cv2

    from usn_offline.certify.bab import BabConfig

    bundle, test, infer = _served_and_nominal(exported_bundle)
    lighting = PhotometricBox(0.95, 1.05, -0.025, 0.025)
    delta = 4.0
    per_frame = FrameCertifier.from_onnx(bundle.onnx_path, bundle.preprocess,
                                         FrameProofConfig(lighting, delta, max_boxes=1))
    capped = FrameCertifier(per_frame.graph, bundle.preprocess,
                            FrameProofConfig(lighting, delta, max_boxes=1, bab=BabConfig()))
    rng = np.random.default_rng(11)
    outcomes = []
    for i in range(6):
        nominal = cv2.resize(test.images[i], (640, 480), interpolation=cv2.INTER_LINEAR)
        top, left = rng.integers(0, 468), rng.integers(0, 624)
        # A white patch that the brighter lighting blows out: its nominal values are hidden.
        # (Darkening these images also clips their black backgrounds, 1-12 % of the frame,
        # and leaves more neurons unstable than the per-frame share gives CROWN.)
        nominal[top:top + 12, left:left + 16] = 1.0
        frame = np.clip(1.05 * nominal + 0.025, 0, 1)
        assert (frame == 1).mean() >= 0.0006
        served = infer(frame)
        proof, forward = per_frame.prove(frame, served), capped.prove(frame, served)
        outcomes.append((proof.status, round(proof.deviation_px, 3), round(forward.deviation_px, 3)))
        assert proof.deviation_px <= forward.deviation_px + 1e-9
        _check_promise(bundle, infer, nominal, served, proof, delta)
    assert all(status is Status.CERTIFIED for status, _, _ in outcomes), outcomes
    # The others: forward suffices. How many need CROWN depends on the trained fixture, hence
    # on the CPU's float kernels (3 of 6 on one machine, 2 on another; 28-40x tighter there).
    assert sum(10 * tight < loose for _, tight, loose in outcomes) >= 1, outcomes


def test_each_box_gets_the_set_of_its_own_lighting(exported_bundle):
    """A clipped pixel's hidden value depends on the lighting (a dark one lies in [0, b]),
    and a frame arises only at some lighting (its darkest pixels rule out brightening): each
    box of the proof is shrunk to where the frame can arise and bounded over its own set.
    On darkened frames (black backgrounds clipped) this proves frames that one set for the
    whole range leaves at hundreds of pixels, and the promise holds."""
    import cv2

    from usn_offline.certify import frame as frame_module

    bundle, test, infer = _served_and_nominal(exported_bundle)
    lighting = PhotometricBox(0.95, 1.05, -0.05, 0.05)
    delta = 4.0
    certifier = FrameCertifier.from_onnx(bundle.onnx_path, bundle.preprocess,
                                         FrameProofConfig(lighting, delta, max_boxes=8))
    whole_range = frame_module.certify_boxes

    def one_set(graph, image, prop, pixels, roots, config, sets=None):
        return whole_range(graph, image, prop, pixels, roots, config)

    outcomes = []
    for i in range(6):
        nominal = cv2.resize(test.images[i], (640, 480), interpolation=cv2.INTER_LINEAR)
        frame = np.clip(0.97 * nominal - 0.03, 0, 1)
        served = infer(frame)
        proof = certifier._prove(frame, served)
        frame_module.certify_boxes = one_set
        try:
            before = certifier._prove(frame, served)
        finally:
            frame_module.certify_boxes = whole_range
        outcomes.append((proof.certified, round(proof.deviation_px, 3), before.certified,
                         round(before.deviation_px, 3), float((frame == 0).mean())))
        _check_promise(bundle, infer, nominal, served, proof, delta)
    assert sum(o[0] for o in outcomes) >= sum(o[2] for o in outcomes) + 1, outcomes
    assert sum(o[0] for o in outcomes) >= 3, outcomes


def test_attacks_on_a_frames_hidden_values_stay_within_its_proof(exported_bundle):
    """Gradient steps on the hidden values of clipped frames (a black corner and a blown
    patch, lit inside the range): what they find is a lower bound on what the proof bounds
    from above (the proof's bound holds against them), and the steps find more than the
    intervals' middles alone."""
    import cv2

    bundle, test, infer = _served_and_nominal(exported_bundle)
    lighting = PhotometricBox(0.9, 1.1, -0.05, 0.05)
    certifier = FrameCertifier.from_onnx(bundle.onnx_path, bundle.preprocess,
                                         FrameProofConfig(lighting, 4.0, max_boxes=8))
    rng = np.random.default_rng(5)
    outcomes = []
    for i in range(4):
        nominal = cv2.resize(test.images[i], (640, 480), interpolation=cv2.INTER_LINEAR)
        nominal[:30, :40] = 0.02  # darkened below 0: its texture is hidden
        top, left = rng.integers(100, 400), rng.integers(100, 560)
        nominal[top:top + 24, left:left + 32] = 0.98  # blown by the brighter lights
        a0, b0 = rng.uniform(1.0, 1.1), (-0.04, 0.04)[i % 2]  # darker: the corner clips; brighter: the patch
        frame = np.clip(a0 * nominal + b0, 0, 1)
        assert (frame == 0).any() if b0 < 0 else (frame == 1).any()
        served = infer(frame)
        proof = certifier.prove(frame, served)
        attacked = certifier.attack(frame, served, grid=3, restarts=2, steps=10)
        middle = certifier.attack(frame, served, grid=3, restarts=1, steps=0)
        outcomes.append((round(proof.deviation_px, 4), round(attacked, 4), round(middle, 4)))
        assert 0 <= middle <= attacked <= proof.deviation_px + 1e-6, outcomes
    assert any(attacked > middle + 1e-4 for _, attacked, middle in outcomes), outcomes


def test_a_frame_that_no_lighting_in_the_range_gives_is_not_certified(tmp_path):
    """Black pixels need a0 X0 + b0 <= 0, so no brightening gives them: under a range that
    only brightens, such a frame is outside the model, and says so."""
    model = random_model("cnn7", 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.float(), (torch.zeros(1, 1, 16, 16),), str(path), dynamo=False, opset_version=17)
    config = PreprocessConfig(input_height=16, input_width=16)
    brighter = PhotometricBox(0.9, 1.1, 0.05, 0.1)
    certifier = FrameCertifier.from_onnx(path, config, FrameProofConfig(brighter, 1e3))
    frame = np.random.default_rng(3).integers(40, 200, (32, 32), dtype=np.uint8)
    served = np.full(4, 0.1)
    assert certifier.prove(frame, served).certified  # delta 1000 px: anything proves
    frame[:2] = 0
    proof = certifier.prove(frame, served)
    assert proof.status is Status.NOT_CERTIFIED and proof.boxes == 0
    assert "no nominal image in [0, 1] gives this frame" in proof.detail


def test_a_float_frame_outside_zero_to_one_is_not_certified(tmp_path):
    """No clip(a X0 + b, 0, 1) has a pixel at -1000 or 1e6: the frame is outside the stated
    model (garbage sensor data), not a frame whose clipped pixels hide nominal values."""
    model = random_model("cnn7", 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.float(), (torch.zeros(1, 1, 16, 16),), str(path), dynamo=False, opset_version=17)
    config = PreprocessConfig(input_height=16, input_width=16)
    certifier = FrameCertifier.from_onnx(path, config, FrameProofConfig(PhotometricBox(0.9, 1.1, -0.1, 0.1), 1e3))
    frame = np.random.default_rng(3).uniform(0.2, 0.8, (32, 32)).astype(np.float32)
    served = np.full(4, 0.1)
    assert certifier.prove(frame, served).certified  # delta 1000 px: anything proves
    for value, shown in ((-1000.0, "from -1000 to"), (1e6, "to 1e+06")):
        odd = frame.copy()
        odd[:3, 0] = value
        proof = certifier.prove(odd, served)
        assert proof.status is Status.NOT_CERTIFIED and proof.boxes == 0, value
        assert shown in proof.detail and "outside [0, 1]" in proof.detail
    exact = frame.copy()
    exact[0, :2] = (0.0, 1.0)  # the ends themselves are clipped pixels, not outside
    assert certifier.prove(exact, served).certified


def test_a_repeated_frame_gets_its_proof_again(exported_bundle):
    """A still camera sends the same frame again and again: its proof is reused (by
    content), and a different frame or different keypoints are proved afresh."""
    from usn_offline.runtime.bundle import Bundle

    bundle = Bundle.load(exported_bundle)
    certifier = FrameCertifier.for_bundle(bundle, max_boxes=2)
    rng = np.random.default_rng(12)
    frames = [rng.integers(30, 220, (48, 64), dtype=np.uint8) for _ in range(FrameCertifier.RECENT_PROOFS + 1)]
    served = np.full(2 * len(bundle.keypoint_names), 0.1)
    calls = []
    prove = certifier._prove
    certifier._prove = lambda frame, keypoints: calls.append(1) or prove(frame, keypoints)
    first = certifier.prove(frames[0], served)
    assert certifier.prove(frames[0].copy(), served) is first and len(calls) == 1
    assert certifier.prove(frames[0], served + 1e-9) is not first and len(calls) == 2
    assert certifier.prove(frames[0][:, :32], served) is not first and len(calls) == 3
    for frame in frames[1:]:  # pushes the first frame out
        certifier.prove(frame, served)
    calls.clear()
    again = certifier.prove(frames[0], served)
    assert len(calls) == 1 and (again.status, again.deviation_px) == (first.status, first.deviation_px)


def test_only_real_nominal_images_falsify(tmp_path):
    """A counterexample of the over-approximating pixel set counts only when the nominal
    image it stands for really gives the frame under the lighting change."""
    model = random_model("cnn7", 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.float(), (torch.zeros(1, 1, 16, 16),), str(path), dynamo=False, opset_version=17)
    config = PreprocessConfig(input_height=16, input_width=16)
    certifier = FrameCertifier.from_onnx(path, config, FrameProofConfig(LIGHTING, 0.0))
    rng = np.random.default_rng(9)
    frame = rng.integers(20, 236, (32, 32), dtype=np.uint8)  # nothing clipped
    served = certifier.graph.evaluate(torch.from_numpy(preprocess(frame, config)).double()[None, None],
                                      torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))[0]
    pixels = PixelMap.for_image(2, 16, 16)
    from usn_offline.certify.spec import KeypointProperty

    prop = KeypointProperty(pixels(served[None])[0], 1e-6)  # float32 vs float64 preprocessing: ~1e-9
    assert certifier._confirm(frame, (1.05, -0.02), prop, pixels) > 0  # a real nominal image: moved
    assert certifier._confirm(frame, (1.0, 0.0), prop, pixels) is None  # the frame itself does not move
    dark = frame.copy()
    dark[:4] = 0  # clipped black: its nominal image needs b >= 0 (a0 X0 + b0 <= 0 with X0 >= 0)
    assert certifier._confirm(dark, (1.05, -0.02), prop, pixels) is None
    assert certifier._confirm(dark, (1.05, 0.02), prop, pixels) > 0


def test_the_proof_process_yields_the_cpu():
    """The node's proof process runs at the lowest priority with torch on one thread, so
    proofs take spare CPU only (serving keeps its core: bench/node_bench.py)."""
    import subprocess
    import sys

    script = ("import os, torch\n"
              "from usn_offline.certify.frame import background_process\n"
              "background_process()\n"
              "print(os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["19", "1"]


def _hidden_offsets_of(nominal_inputs: np.ndarray, sets: FramePixelSets, a: float, b: float) -> np.ndarray:
    """t of the form x = a (u + t) + b of the network inputs of nominal images (N, H, W)
    under the inverse lighting (a, b) (FramePixelSets.hidden_offsets)."""
    return (nominal_inputs - b) / a - sets.value.numpy()


def _sampled_nominals(rng: np.random.Generator, frame: np.ndarray, points, config: PreprocessConfig) -> np.ndarray:
    """One nominal image's network input per (a, b) of ``points``, every hidden value drawn
    on its own (a third of them at their interval's ends)."""
    x = frame.astype(np.float64) / 255
    dark, bright = x <= 0, x >= 1
    out = []
    for pa, pb in points:
        pick = rng.random(x.shape)
        pick = np.where(rng.random(x.shape) < 0.3, pick.round(), pick)
        lowest = min(pa + pb, 1.0)
        out.append(_nominal_input(np.where(dark, pick * max(pb, 0.0), np.where(bright, lowest + pick * (1 - lowest),
                                                                               pa * x + pb)), config))
    return np.stack(out)


def test_set_splits_cover_the_set_and_bound_their_part():
    """FramePixelSets.split halves one pixel's hidden offset: the two parts' intervals
    together are the whole set's at every pixel; a box where a part leaves a pixel no
    value is empty; and the bounds over each part hold every sampled nominal image whose
    offsets lie in it (every sample lies in one of them)."""
    graph = lower(random_model("cnn7", 23, input_norm="standardise"), (1, 16, 16))
    config = PreprocessConfig(input_height=16, input_width=16)
    pixels = PixelMap.for_image(2, 16, 16)
    rng = np.random.default_rng(11)
    frame = np.rint(255 * np.clip(1.1 * _camera(rng, (32, 32)) - 0.04, 0, 1)).astype(np.uint8)
    sets = FramePixelSets.of_frame(frame, config, LIGHTING)
    box = sets.restrict(Boxes.from_boxes([inverse_box(LIGHTING)]))
    # Halving the box into itself gains nothing: the split must part the set.
    pair = sets.split(graph, box, [None], torch.tensor([0]), (box, box))[0]
    assert pair is not None
    whole_lo, whole_hi = sets.hidden_offsets(box)
    (lo_1, hi_1), (lo_2, hi_2) = (sets.hidden_offsets(box, [part]) for part in pair)
    assert torch.equal(torch.minimum(lo_1, lo_2), whole_lo) and torch.equal(torch.maximum(hi_1, hi_2), whole_hi)
    assert (lo_2 <= hi_1).all() and ((hi_1 < whole_hi) | (lo_2 > whole_lo)).sum() == 1  # one pixel, halved
    assert (whole_hi - whole_lo).flatten()[(hi_1 < whole_hi).flatten()].item() > 0
    # A part that leaves a pixel no value: its box is empty; the parts themselves are not.
    nowhere = (pair[0][0], pair[0][1].clone())
    nowhere[1].view(-1)[int((hi_1 < whole_hi).flatten().nonzero())] = -10.0
    restricted = sets.restrict(box, [pair[0], pair[1], nowhere])
    assert (restricted.a_lo <= restricted.a_hi).tolist() == [True, True, False]
    plain = PhotometricBox(*(float(v[0]) for v in (box.a_lo, box.a_hi, box.b_lo, box.b_hi)))
    points = _feasible_points(rng, plain, frame, 60)
    nominal = _sampled_nominals(rng, frame, points, config)
    options = BoundOptions(intermediate="crown", max_elements=4096)
    one = torch.ones(len(points), dtype=torch.float64)
    with torch.no_grad():
        out = pixels(graph.evaluate(torch.from_numpy(nominal)[:, None], one, one - 1))
    seen = np.zeros(len(points), dtype=bool)
    for part in pair:
        lo, hi = output_bounds(*sets.bound_inputs(graph, box, [part]), pixels, options=options)
        limit_lo, limit_hi = (p.numpy()[0] for p in part)
        for k, (pa, pb) in enumerate(points):
            t = _hidden_offsets_of(nominal[k][None], sets, pa, pb)
            if (t >= limit_lo - 1e-12).all() and (t <= limit_hi + 1e-12).all():
                seen[k] = True
                assert (out[k] >= lo[0] - 1e-9).all() and (out[k] <= hi[0] + 1e-9).all()
    assert seen.all()


class _CountingSplits(FramePixelSets):
    """The sets, counting the splits of the set (not of the box) they hand out."""

    def split(self, graph, boxes, parts, worst, halved):
        pairs = super().split(graph, boxes, parts, worst, halved)
        self.__dict__["parted"] = self.__dict__.get("parted", 0) + sum(p is not None for p in pairs)
        return pairs


def test_branch_and_bound_splits_the_set_once_near_and_stays_sound():
    """certify_boxes splits a frame's set (not only its box) once a box's bounds miss the
    property by at most split_sets_within deltas, never with 0; its bounds hold sampled
    nominal images either way."""
    import dataclasses

    from usn_offline.certify.bab import BabConfig, certify_boxes
    from usn_offline.certify.spec import KeypointProperty

    graph = lower(random_model("cnn7", 24, input_norm="standardise"), (1, 16, 16))
    config = PreprocessConfig(input_height=16, input_width=16)
    pixels = PixelMap.for_image(2, 16, 16)
    rng = np.random.default_rng(5)
    frame = np.rint(255 * np.clip(1.1 * _camera(rng, (32, 32)) - 0.04, 0, 1)).astype(np.uint8)
    inverse = inverse_box(LIGHTING)
    image = torch.from_numpy(preprocess(frame, config)).double()[None, None]
    one = torch.ones(1, dtype=torch.float64)
    reference = pixels(graph.evaluate(image, one, one - 1))[0].detach()
    fields = {f.name: getattr(FramePixelSets.of_frame(frame, config, LIGHTING), f.name)
              for f in dataclasses.fields(FramePixelSets)}
    probe = _CountingSplits(**fields)
    root = probe.restrict(Boxes.from_boxes([inverse]))
    lo, hi = output_bounds(*probe.bound_inputs(graph, root), pixels, options=BoundOptions(intermediate="crown"))
    deviation = float(torch.maximum(reference - lo, hi - reference).max())
    prop = KeypointProperty(reference, 0.3 * deviation)  # misses at the root by 0.7 deviation = 2.3 deltas
    outcomes = {}
    for within in (0.0, 3.0):
        sets = _CountingSplits(**fields)
        bab = BabConfig(max_boxes=12, max_depth=8, bounds=BoundOptions(intermediate="crown"),
                        split_sets_within=within)
        outcomes[within] = certify_boxes(graph, sets.for_boxes(root), prop, pixels, [inverse], bab, sets)[0]
        assert sets.__dict__.get("parted", 0) == 0 if within == 0 else sets.__dict__["parted"] > 0
    points = _feasible_points(rng, inverse, frame, 60)
    nominal = _sampled_nominals(rng, frame, points, config)
    many = torch.ones(len(points), dtype=torch.float64)
    with torch.no_grad():
        out = pixels(graph.evaluate(torch.from_numpy(nominal)[:, None], many, many - 1)).numpy()
    for outcome in outcomes.values():
        assert (out >= np.asarray(outcome.lower) - 1e-9).all() and (out <= np.asarray(outcome.upper) + 1e-9).all()
