"""CROWN intermediate bounds: the receptive-field (patches) backward pass equals the dense
one, the bounds it gives are sound, and they are never looser than forward bounds."""

import numpy as np
import pytest
import torch
from certify_helpers import random_model, sample_image  # noqa: E402  (tests/certify_helpers.py)

from usn_offline.certify import Boxes, PixelMap, lower, output_bounds
from usn_offline.certify.bounds import BoundOptions
from usn_offline.certify.boxes import linear_min
from usn_offline.certify.crown import backward_linear, crown_intermediate
from usn_offline.certify.forward import propagate
from usn_offline.certify.ops import ReluOp
from usn_offline.certify.patches import signed_neuron_bounds
from usn_offline.perturb import PhotometricBox

SIZE = 16


_model, _image = random_model, sample_image


BOXES = [PhotometricBox(0.8, 1.15, -0.12, 0.1), PhotometricBox(0.95, 1.05, -0.02, 0.03),
         PhotometricBox(0.6, 0.9, 0.05, 0.2)]


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
@pytest.mark.parametrize("clip", [True, False])
def test_patches_pass_equals_the_dense_pass(family, clip):
    graph = lower(_model(family, 1), (1, SIZE, SIZE), clip=clip)
    image = _image(1)
    boxes = Boxes.from_boxes(BOXES)
    fwd = propagate(graph, image, boxes)
    rng = np.random.default_rng(0)
    checked = 0
    for node in range(1, len(graph.nodes)):
        if isinstance(graph.nodes[node].op, ReluOp):
            continue
        numel = int(np.prod(graph.nodes[node].shape))
        neurons = torch.as_tensor(rng.choice(numel, size=min(numel, 7), replace=False))
        box_index = torch.arange(len(boxes)).repeat_interleave(len(neurons))
        neuron = neurons.repeat(len(boxes))
        sign = torch.cat([torch.ones(len(neuron)), -torch.ones(len(neuron))]).double()  # lower, then -upper
        both = signed_neuron_bounds(graph, fwd, image, boxes, node, box_index.repeat(2), neuron.repeat(2), sign,
                                    max_elements=4096)
        lo, hi = both[:len(neuron)], -both[len(neuron):]
        rows = torch.zeros(2 * len(neurons), numel, dtype=torch.float64)
        rows[torch.arange(len(neurons)), neurons] = 1.0
        rows[len(neurons) + torch.arange(len(neurons)), neurons] = -1.0
        dense = linear_min(backward_linear(graph, fwd.__class__(**{**fwd.__dict__, "kept_linear": {}}), image,
                                           rows, start=node), boxes)
        k = len(neurons)
        torch.testing.assert_close(lo, dense[:, :k].flatten(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hi, -dense[:, k:].flatten(), rtol=1e-10, atol=1e-10)
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
def test_crown_intermediate_bounds_are_sound_and_tighter(family):
    graph = lower(_model(family, 2), (1, SIZE, SIZE))
    image = _image(2)
    boxes = Boxes.from_boxes(BOXES)
    fwd = propagate(graph, image, boxes)
    tight = crown_intermediate(graph, image, boxes, max_elements=4096)
    rng = np.random.default_rng(2)
    values = {}
    for k, box in enumerate(BOXES):
        a = torch.tensor(rng.uniform(box.a_lo, box.a_hi, 400))
        b = torch.tensor(rng.uniform(box.b_lo, box.b_hi, 400))
        a[:4] = torch.tensor([box.a_lo, box.a_lo, box.a_hi, box.a_hi], dtype=torch.float64)
        b[:4] = torch.tensor([box.b_lo, box.b_hi, box.b_lo, box.b_hi], dtype=torch.float64)
        values[k] = _relu_inputs(graph, image, a, b)
    for r, (lo, hi) in tight.relu_input.items():
        flo, fhi = fwd.relu_input[r]
        assert (lo >= flo - 1e-12).all() and (hi <= fhi + 1e-12).all()
        for k in range(len(BOXES)):
            v = values[k][r]
            assert (v >= lo[k] - 1e-9).all() and (v <= hi[k] + 1e-9).all(), (r, k)
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    flo, fhi = output_bounds(graph, image, boxes, pixels, "crown", BoundOptions(intermediate="forward"))
    clo, chi = output_bounds(graph, image, boxes, pixels, "crown", BoundOptions(intermediate="crown"))
    assert ((chi - clo) <= (fhi - flo) + 1e-9).all()
    assert ((chi - clo).sum() < (fhi - flo).sum())


def _relu_inputs(graph, image, a, b) -> dict[int, torch.Tensor]:
    """The exact input of every ReLU over a batch of (a, b) values."""
    from usn_offline.certify.ops import AddOp, AffineOp, SemanticInputOp
    values, out = [None] * len(graph.nodes), {}
    for i, node in enumerate(graph.nodes):
        op = node.op
        if isinstance(op, SemanticInputOp):
            values[i] = image * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1)
        elif isinstance(op, AffineOp):
            values[i] = op.apply(values[node.inputs[0]])
        elif isinstance(op, ReluOp):
            out[i] = values[node.inputs[0]]
            values[i] = torch.relu(out[i])
        elif isinstance(op, AddOp):
            values[i] = sum(c * values[j] for c, j in zip(op.coeffs, node.inputs, strict=True))
    return out


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
@pytest.mark.parametrize("clip", [True, False])
def test_one_side_first_gives_the_relaxations_of_both_sides(family, clip):
    """A neuron that its first bound makes stable skips the other backward pass: every
    ReLU relaxation, and so the output bounds, stay those of bounding both sides, while
    neurons do settle in the first pass (work saved)."""
    from usn_offline.certify import crown
    from usn_offline.certify.forward import relu_slopes

    graph = lower(_model(family, 3), (1, SIZE, SIZE), clip=clip)
    image = _image(3)
    boxes = Boxes.from_boxes(BOXES)
    rows = []
    real = crown.signed_neuron_bounds

    def counting(*args, **kwargs):
        rows.append(args[5].numel())
        return real(*args, **kwargs)

    crown.signed_neuron_bounds = counting
    try:
        both = crown_intermediate(graph, image, boxes, max_elements=4096, one_side_first=False)
        rows_both = sum(rows)
        rows.clear()
        first = crown_intermediate(graph, image, boxes, max_elements=4096)
        rows_first = sum(rows)
    finally:
        crown.signed_neuron_bounds = real
    for r, (lo, hi) in both.relu_input.items():
        for mine, theirs in zip(relu_slopes(*first.relu_input[r])[:3], relu_slopes(lo, hi)[:3], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    eye = torch.diag(pixels.scale)
    spec = torch.cat([eye, -eye])
    torch.testing.assert_close(linear_min(backward_linear(graph, first, image, spec), boxes),
                               linear_min(backward_linear(graph, both, image, spec), boxes), rtol=1e-12, atol=1e-12)
    assert rows_first < rows_both, (rows_first, rows_both)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
def test_a_forward_pass_resumed_at_a_relu_equals_one_from_the_start(family):
    graph = lower(_model(family, 4), (1, SIZE, SIZE))
    image = _image(4)
    boxes = Boxes.from_boxes(BOXES)
    relus = graph.relu_indices
    full = propagate(graph, image, boxes, save_at=relus)
    assert set(full.states) == set(relus)
    for r in relus[1:]:
        # Bounds from elsewhere narrow this ReLU's input (the middle half of each interval:
        # an equality check, not a sound bound); the pass resumes just before it.
        lo, hi = full.relu_input[r]
        narrowed = {r: (0.75 * lo + 0.25 * hi, 0.25 * lo + 0.75 * hi)}
        again = propagate(graph, image, boxes, relu_bounds=narrowed)
        resumed = propagate(graph, image, boxes, relu_bounds=narrowed, resume=full.states[r])
        assert set(resumed.relu_input) == set(again.relu_input)
        for k, (a_lo, a_hi) in again.relu_input.items():
            torch.testing.assert_close(resumed.relu_input[k][0], a_lo, rtol=0, atol=0)
            torch.testing.assert_close(resumed.relu_input[k][1], a_hi, rtol=0, atol=0)
        for mine, theirs in ((resumed.out_lo, again.out_lo), (resumed.out_hi, again.out_hi),
                             (resumed.out_lower, again.out_lower), (resumed.out_upper, again.out_upper)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        assert not torch.equal(again.out_lo, full.out_lo)  # the narrowing reached the output


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
def test_crown_intermediate_from_a_pass_already_made_equals_its_own(family):
    """output_bounds hands its first forward pass (with the stops and a cut's linear bounds
    kept) to the CROWN intermediate bounds, which start from it instead of a pass of their own."""
    from usn_offline.certify.crown import relus_needing_backward

    graph = lower(_model(family, 5), (1, SIZE, SIZE))
    image = _image(5)
    boxes = Boxes.from_boxes(BOXES)
    own = crown_intermediate(graph, image, boxes, max_elements=4096)
    first = propagate(graph, image, boxes, keep_linear=(graph.default_cut(),),
                      save_at=relus_needing_backward(graph))
    started = crown_intermediate(graph, image, boxes, max_elements=4096, start=first)
    assert started is not first and first.states and first.kept_linear  # the pass handed over is untouched
    assert not started.kept_linear and not started.states  # backward passes from here go to the input
    for r, (lo, hi) in own.relu_input.items():
        assert torch.equal(started.relu_input[r][0], lo) and torch.equal(started.relu_input[r][1], hi)
    assert torch.equal(started.out_lo, own.out_lo) and torch.equal(started.out_hi, own.out_hi)


@pytest.mark.parametrize("family", ["cnn7", "resnet"])
@pytest.mark.parametrize("clip", [True, False])
def test_a_sub_box_starts_from_the_relu_bounds_of_its_box(family, clip):
    """Branch and bound hands a box's ReLU-input bounds (``learned``) to its halves
    (``prior``): they hold over the box (sampled), and the halves' bounds stay sound and
    are never looser than without them."""
    graph = lower(_model(family, 6), (1, SIZE, SIZE), clip=clip)
    image = _image(6)
    pixels = PixelMap.for_image(2, SIZE, SIZE)
    parent = PhotometricBox(0.8, 1.2, -0.15, 0.15)
    options = BoundOptions(intermediate="crown")
    learned = {}
    output_bounds(graph, image, Boxes.from_boxes([parent]), pixels, "crown", options, learned=learned)
    assert learned
    rng = np.random.default_rng(6)
    a = torch.tensor(rng.uniform(parent.a_lo, parent.a_hi, 300))
    b = torch.tensor(rng.uniform(parent.b_lo, parent.b_hi, 300))
    for r, v in _relu_inputs(graph, image, a, b).items():
        if r in learned:
            assert (v >= learned[r][0] - 1e-9).all() and (v <= learned[r][1] + 1e-9).all(), r
    for half in (PhotometricBox(0.8, 1.0, -0.15, 0.15), PhotometricBox(1.0, 1.2, 0.0, 0.15)):
        box = Boxes.from_boxes([half])
        alone = output_bounds(graph, image, box, pixels, "crown", options)
        started = output_bounds(graph, image, box, pixels, "crown", options, prior=learned)
        assert ((started[1] - started[0]) <= (alone[1] - alone[0]) + 1e-9).all()
        a = torch.tensor(rng.uniform(half.a_lo, half.a_hi, 300))
        b = torch.tensor(rng.uniform(half.b_lo, half.b_hi, 300))
        out = pixels(graph.evaluate(image, a, b))
        assert (out >= started[0] - 1e-9).all() and (out <= started[1] + 1e-9).all()
    # The halves' own ReLU bounds narrowed to their middle half (not sound: a check that
    # the prior reaches every layer's relaxation) give narrower output bounds.
    own = {}
    alone = output_bounds(graph, image, box, pixels, "crown", options, learned=own)
    narrowed = {r: (0.75 * lo + 0.25 * hi, 0.25 * lo + 0.75 * hi) for r, (lo, hi) in own.items()}
    started = output_bounds(graph, image, box, pixels, "crown", options, prior=narrowed)
    assert float((started[1] - started[0]).sum()) < float((alone[1] - alone[0]).sum()) - 1e-6
