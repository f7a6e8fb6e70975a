"""Lowering refuses what it cannot represent exactly, and represents the rest exactly:
BatchNorm is folded into a convolution only when nothing else reads it, ignored layer
options are refused, and a layer that computes something else than its type says (a
forward hook) is caught by the numerical check at lowering time."""

import pytest
import torch
from certify_helpers import randomise_batchnorms  # noqa: E402  (tests/certify_helpers.py)
from torch import nn

from usn_offline.certify import Boxes, Method, PixelMap, lower, output_bounds
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.ops import ChannelAffineOp, Conv2dOp
from usn_offline.perturb import PhotometricBox

SIZE = 8


def _randomise_batchnorms(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorms(model, mean=0.5, var=(0.3, 2.0), weight=(0.5, 2.0), bias=0.5)


class SharedConv(nn.Module):
    """A convolution read twice: by a residual add and, through Dropout, by a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * SIZE * SIZE, 4))

    def forward(self, x):
        y = self.conv(x)
        return self.head(self.relu(y + self.bn(self.drop(y))))


class TwoBatchNorms(nn.Module):
    """conv -> bn1 -> bn2, with bn1's output also read by a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2))

    def forward(self, x):
        y = self.bn1(self.conv(x))
        return self.head(y + self.bn2(y))


class Folded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(3 * SIZE * SIZE, 2))

    def forward(self, x):
        return self.body(x)


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 1, SIZE, SIZE, generator=g, dtype=torch.float64)


def _graph_matches_model(model: nn.Module):
    graph = lower(model, (1, SIZE, SIZE))
    x = torch.rand(5, 1, SIZE, SIZE, dtype=torch.float64)
    a, b = torch.tensor([1.0, 0.8, 1.2, 1.0, 0.5], dtype=torch.float64), torch.tensor(
        [0.0, 0.1, -0.1, 0.3, 0.0], dtype=torch.float64)
    want = model.double()(torch.clamp(x * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1), 0, 1))
    torch.testing.assert_close(graph.evaluate(x, a, b), want, atol=1e-10, rtol=1e-10)
    return graph


@pytest.mark.parametrize("model_cls", [SharedConv, TwoBatchNorms])
def test_batchnorm_is_not_folded_into_a_convolution_read_elsewhere(model_cls):
    model = _randomise_batchnorms(model_cls())
    graph = _graph_matches_model(model)
    assert any(isinstance(n.op, ChannelAffineOp) and not n.name.startswith("clip") for n in graph.nodes)
    # And the bounds contain every sampled output.
    image, box = _image(), PhotometricBox(0.85, 1.15, -0.1, 0.1)
    pixels = PixelMap.for_image(model.head[-1].out_features // 2, SIZE, SIZE)
    for method in (Method.IBP, Method.CROWN):
        lo, hi = output_bounds(graph, image, Boxes.from_boxes([box]), pixels, method)
        a = torch.linspace(box.a_lo, box.a_hi, 21).repeat_interleave(21)
        b = torch.linspace(box.b_lo, box.b_hi, 21).repeat(21)
        out = pixels(graph.evaluate(image, a.double(), b.double()))
        assert (out >= lo - 1e-9).all() and (out <= hi + 1e-9).all(), method


def test_batchnorm_after_a_convolution_read_once_is_folded():
    graph = _graph_matches_model(_randomise_batchnorms(Folded()))
    convs = [n for n in graph.nodes if isinstance(n.op, Conv2dOp)]
    assert len(convs) == 1 and "+" in convs[0].name
    assert not any(isinstance(n.op, ChannelAffineOp) and not n.name.startswith("clip") for n in graph.nodes)


def test_avgpool_divisor_override_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2, divisor_override=1), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 2)).eval()
    with pytest.raises(CertificationError, match="divisor_override"):
        lower(model, (1, SIZE, SIZE))


def test_a_layer_that_is_not_what_its_type_says_is_refused():
    """A forward hook changes what a Conv2d computes; lowering reads only its weights, and
    the numerical check at lowering time catches the difference."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * SIZE * SIZE, 2))
    model[0].register_forward_hook(lambda module, inputs, output: 2.0 * output)
    with pytest.raises(CertificationError, match="does not compute what the model computes"):
        lower(model.eval(), (1, SIZE, SIZE))


def test_a_submodule_left_in_training_mode_is_refused():
    """The top module in eval mode, a BatchNorm inside it not: its batch statistics are not
    what the lowering (running statistics) certifies."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * SIZE * SIZE, 2)).eval()
    model[1].train()
    with pytest.raises(CertificationError, match="put the model in eval mode .*: 1 is training"):
        lower(model, (1, SIZE, SIZE))


class _ResidualInPlace(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv, self.relu, self.functional = nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(inplace=True), functional
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 2))

    def forward(self, x):
        h = self.conv(x)
        return self.head(h + (torch.nn.functional.relu(h, inplace=True) if self.functional else self.relu(h)))


@pytest.mark.parametrize("functional", [False, True])
def test_an_in_place_relu_is_refused(functional):
    """torch computes 2 relu(h) here (relu_ overwrote h before the add reads it), the graph
    h + relu(h): equal wherever h > 0, so a few test inputs may not tell them apart."""
    with pytest.raises(CertificationError, match="in-place ReLU"):
        lower(_ResidualInPlace(functional).eval(), (1, SIZE, SIZE))
