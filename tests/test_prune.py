"""USN pruning: scores against a hand-computed case, structural pruning is exact, the
Wasserstein loss behaves as specified, the progressive pipeline and ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

from usn_offline.errors import ConfigError
from usn_offline.models import build_model, count_parameters, model_config_for
from usn_offline.prune import (
    PruneConfig,
    concentration_loss,
    masked,
    neuron_groups,
    prune_model,
    prune_structure,
    two_point_target,
    usn_from_samples,
    usn_scores,
    wasserstein_1d,
)
from usn_offline.prune.criteria import select_keep
from usn_offline.prune.groups import NeuronGroup
from usn_offline.prune.structural import fold_output_scales, scaled_outputs


class _TwoNeurons(nn.Module):
    """z = w * x + c on a 1x1 image: neuron 0 (w=1, c=0), neuron 1 (w=-1, c=0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.5]))

    def forward(self, x):
        return self.relu(self.conv(x))


def test_usn_matches_hand_computed_case():
    model = _TwoNeurons()
    group = NeuronGroup("n", "relu", 2, ("conv",), "none", 1, ("widths", 0))
    # Image x = 0.5; perturbations (a, b) = (0.8, 0), (1.2, 0), (1, -0.2), (1, 0.2)
    # x' = 0.4, 0.6, 0.3, 0.7 (no clipping).
    stats = usn_scores(model, [group], np.full((1, 1, 1), 0.5), [0.8, 1.2, 1.0, 1.0], [0.0, 0.0, -0.2, 0.2])["n"]
    # Neuron 0: z0 = 0.5, z = [0.4, 0.6, 0.3, 0.7]: mean 0.5 (bias 0), std sqrt(0.025), scale 0.5.
    # Neuron 1: z0 = 0.0, z = [0.1, -0.1, 0.2, -0.2]: mean 0 (bias 0), same std, scale 0 -> 1e-12
    #   (an always-near-zero neuron is maximally unstable relative to its size), straddles 0.
    std = np.sqrt(0.025)
    assert stats.scale[0].item() == pytest.approx(0.5)
    assert stats.bias[0].item() == pytest.approx(0.0, abs=1e-7)
    assert stats.smooth[0].item() == pytest.approx(std / 0.5, rel=1e-6)
    assert stats.near.tolist() == [0.0, 1.0] and stats.straddle.tolist() == [0.0, 1.0]
    assert stats.score[0].item() == pytest.approx(1 / (1 + std / 0.5), rel=1e-6)
    assert stats.score[1].item() < 1e-6
    assert stats.active.tolist() == pytest.approx([1.0, 2 / 5])


def test_usn_terms_on_explicit_samples():
    # One neuron, two positions: z0 = [2, -1]; samples at position 0: [3, 3] (shift 1, std 0),
    # position 1: [-2, 1] (shift |(-0.5) - (-1)| = 0.5, std 1.5, straddles 0).
    z0 = torch.tensor([[[2.0, -1.0]]])
    z = torch.tensor([[[[3.0, -2.0]], [[3.0, 1.0]]]])
    s = usn_from_samples(z0, z)
    scale = np.sqrt((4 + 1) / 2)
    assert s.bias.item() == pytest.approx((1 + 0.5) / 2 / scale)
    assert s.smooth.item() == pytest.approx((0 + 1.5) / 2 / scale)
    assert s.near.item() == pytest.approx(0.5) and s.straddle.item() == pytest.approx(0.5)
    assert s.score.item() == pytest.approx(1 / (1 + 0.75 / scale + 0.75 / scale + 0.5))
    dead = usn_from_samples(-z0.abs() - 1, -z.abs() - 1)
    assert dead.score.item() == 0.0  # never active: free to remove, ranked first


def test_wasserstein_matches_scipy_and_target():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=50), rng.uniform(size=50)
    assert wasserstein_1d(torch.tensor(u), torch.tensor(v)).item() == pytest.approx(wasserstein_distance(u, v))
    assert two_point_target(10, 0.3).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    # Already the target distribution (in any order): zero loss.
    assert concentration_loss(torch.tensor([1.0, 0.0, 1.0, 0.0]), 0.5).item() == 0.0
    # Hand case: gates [0.9, 0.2, 0.6, 0.4], r = 0.5 -> sorted [0.2, 0.4, 0.6, 0.9] vs [0, 0, 1, 1]:
    # (0.2 + 0.4 + 0.4 + 0.1) / 4.
    assert concentration_loss(torch.tensor([0.9, 0.2, 0.6, 0.4]), 0.5).item() == pytest.approx(0.275)
    with pytest.raises(ConfigError, match="equal size"):
        wasserstein_1d(torch.zeros(3), torch.zeros(4))


def test_concentration_loss_gradient_pushes_lowest_gates_to_zero():
    gates = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.7, 0.3], requires_grad=True)
    concentration_loss(gates, 0.5).backward()
    # A gradient step lowers the three lowest gates (0.2, 0.3, 0.4) and raises the others,
    # wherever they sit in the vector (i.e. in whichever layer).
    assert (gates.grad[[1, 3, 5]] > 0).all() and (gates.grad[[0, 2, 4]] < 0).all()
    # Gradient descent on the loss alone converges to the two-point target.
    g = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.7, 0.3], requires_grad=True)
    opt = torch.optim.SGD([g], lr=0.03)
    for _ in range(400):
        opt.zero_grad()
        concentration_loss(g, 0.5).backward()
        opt.step()
    assert g.detach().tolist() == pytest.approx([1, 0, 1, 0, 1, 0], abs=1e-2)


@pytest.mark.parametrize("family,widths", [("cnn7", (6, 8, 8, 10, 10)), ("resnet", (6, 8, 10))])
def test_structural_pruning_equals_masked_original(family, widths):
    torch.manual_seed(0)
    model = build_model(model_config_for(family, widths=widths, hidden=24)).eval()
    if family == "resnet":  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(1)
    keep = {g.name: torch.randperm(g.size, generator=gen)[:max(1, g.size // 2)] for g in neuron_groups(model)}
    x = torch.rand(5, 1, 64, 64)
    with torch.no_grad(), masked(model, keep):
        expected = model(x)
    smaller = prune_structure(model, keep)
    assert count_parameters(smaller) < count_parameters(model)
    assert {g.name: g.size for g in neuron_groups(smaller)} == {k: len(v) for k, v in keep.items()}
    with torch.no_grad():
        assert torch.allclose(smaller(x), expected, atol=1e-5)
        assert not torch.allclose(model(x), expected, atol=1e-3)  # the mask did change the function
    # The pruned model rebuilds from its own config (what a checkpoint stores).
    rebuilt = build_model(smaller.config)
    rebuilt.load_state_dict(smaller.state_dict())


def test_folding_gates_is_exact():
    torch.manual_seed(0)
    model = build_model(model_config_for("resnet", widths=(6, 8, 10), hidden=12)).eval()
    scales = {g.name: torch.rand(g.size) for g in neuron_groups(model)}
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad(), scaled_outputs(model, scales):
        expected = model(x)
    fold_output_scales(model, scales)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_select_keep_global_uniform_and_floors():
    scores = {"a": torch.tensor([0.1, 0.2, 0.9, 0.8]), "b": torch.tensor([0.5, 0.6, 0.7, 0.05])}
    glob = select_keep(scores, 3, {"a": 1, "b": 1}, "global")
    assert glob["a"].tolist() == [2, 3] and glob["b"].tolist() == [0, 1, 2]
    uni = select_keep(scores, 4, {"a": 1, "b": 1}, "uniform")
    assert uni["a"].tolist() == [2, 3] and uni["b"].tolist() == [1, 2]
    floored = select_keep(scores, 4, {"a": 3, "b": 1}, "global")
    assert len(floored["a"]) == 3 and len(floored["b"]) == 1
    with pytest.raises(ConfigError, match="cannot remove"):
        select_keep(scores, 7, {"a": 1, "b": 1})


def test_progressive_pruning_and_onnx_export(tiny_dataset, tmp_path):
    import onnxruntime as ort

    from usn_offline.data import load_split
    from usn_offline.export.onnx_model import export_onnx
    from usn_offline.runtime.preprocess import PreprocessConfig
    from usn_offline.train import CheckpointInfo, TrainConfig

    train, val = load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val")
    torch.manual_seed(0)
    model = build_model(model_config_for("cnn7", widths=(8, 8, 8, 16, 16), hidden=32)).eval()
    results = {}
    for method in ("usn-wd", "usn", "magnitude", "random"):
        cfg = PruneConfig(method=method, ratio=0.5, rounds=2, finetune_epochs=1, score_images=16, score_samples=6)
        results[method] = prune_model(model, train, val, cfg, train_config=TrainConfig(batch_size=32),
                                      progress=False)
    for method, res in results.items():
        assert [r.round for r in res.rounds] == [0, 1, 2], method
        assert res.rounds[-1].removed_fraction == pytest.approx(0.5, abs=0.02), method
        assert res.rounds[-1].parameters < res.rounds[0].parameters
        assert res.rounds[-1].macs < res.rounds[0].macs
    # The baselines thin every layer alike; USN ranks all neurons together.
    assert len(set(np.round([w / o for w, o in zip(results["random"].rounds[-1].widths.values(),
                                                  results["random"].rounds[0].widths.values(), strict=True)], 1)
                   )) <= 2
    pruned = results["usn-wd"].model
    info = CheckpointInfo(model=pruned.config, preprocess=PreprocessConfig(64, 64),
                          keypoint_names=train.keypoint_names)
    onnx_path = export_onnx(pruned, info, tmp_path / "pruned.onnx")
    x = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        assert np.allclose(got, pruned(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert model.config.widths == (8, 8, 8, 16, 16)  # the input model is untouched


def test_prune_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown pruning method"):
        PruneConfig(method="l0")
    with pytest.raises(ConfigError, match="ratio"):
        PruneConfig(ratio=1.0)


def test_resnet_prunes_through_the_pipeline(tiny_dataset):
    from usn_offline.data import load_split
    from usn_offline.train import TrainConfig

    train, val = load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val")
    torch.manual_seed(0)
    model = build_model(model_config_for("resnet", widths=(6, 8, 10), hidden=16)).eval()
    for method in ("usn-wd", "magnitude"):
        res = prune_model(model, train, val, PruneConfig(method=method, ratio=0.4, rounds=1, finetune_epochs=1,
                                                         score_images=8, score_samples=6),
                          train_config=TrainConfig(batch_size=32), progress=False)
        widths = res.rounds[-1].widths
        assert sum(widths.values()) == round(0.6 * (8 + 10 + 16)), method
        assert res.model.config.extra["mid_widths"] == [widths["block1.mid"], widths["block2.mid"]]
        assert res.rounds[-1].parameters < res.rounds[0].parameters


def test_finetune_keeps_the_bound_loss_when_asked():
    """Pruning's fine-tuning rounds with the bound loss on: the same data and seed give a
    different network than without it, and its bounds over the box are narrower."""
    import copy

    from certify_helpers import random_model, sample_image  # noqa: E402  (tests/certify_helpers.py)

    from usn_offline.data.dataset import KeypointDataset
    from usn_offline.prune.finetune import finetune
    from usn_offline.train.bound_loss import BoundLossConfig, keypoint_bounds
    from usn_offline.train.loop import TrainConfig

    rng = np.random.default_rng(0)
    images = np.concatenate([sample_image(s).numpy()[0] for s in range(16)]).astype(np.float32)
    data = KeypointDataset(images=images, keypoints=rng.uniform(2, 13, (16, 2, 2)).astype(np.float32),
                           keypoint_names=("a", "b"), file_names=tuple(f"{i}.png" for i in range(16)), split="train")
    base = random_model("cnn7", 3).float()
    plain, tuned = copy.deepcopy(base), copy.deepcopy(base)
    config = TrainConfig(batch_size=8, device="cpu")
    finetune(plain, data, 2, 1e-3, config, torch.device("cpu"), progress=False)
    bound = BoundLossConfig(weight=1.0, eps=0.05, ramp_epochs=0, images_per_batch=8)
    finetune(tuned, data, 2, 1e-3, config, torch.device("cpu"), progress=False, bound=bound)
    x = torch.from_numpy(images[:4]).unsqueeze(1).double()
    with torch.no_grad():
        bounds = [keypoint_bounds(m.double().eval(), x, 0.05) for m in (plain, tuned)]
    widths = [float((hi - lo).mean()) for lo, hi in bounds]
    assert widths[1] < widths[0], widths
