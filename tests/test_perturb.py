"""The photometric perturbation clip(a*x + b, 0, 1) on numpy and torch inputs."""

import numpy as np
import pytest
import torch

from usn_offline.errors import ConfigError
from usn_offline.perturb import PhotometricBox, apply_photometric, sample_photometric


def test_clipped_and_unclipped():
    x = np.array([0.0, 0.5, 0.9])
    np.testing.assert_allclose(apply_photometric(x, 1.2, 0.1), [0.1, 0.7, 1.0])
    np.testing.assert_allclose(apply_photometric(x, 1.2, 0.1, clip=False), [0.1, 0.7, 1.18])


def test_torch_batch_broadcast():
    x = torch.full((2, 1, 2, 2), 0.5)
    a = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    out = apply_photometric(x, a, 0.0)
    assert out[0].max().item() == 0.25 and out[1].min().item() == 1.0


def test_box_validation_and_sampling():
    box = PhotometricBox.symmetric(0.2, 0.1)
    assert (box.a_lo, box.a_hi, box.b_lo, box.b_hi) == pytest.approx((0.8, 1.2, -0.1, 0.1))
    a, b = sample_photometric(box, 1000, np.random.default_rng(0))
    assert all(box.contains(ai, bi) for ai, bi in zip(a, b, strict=True))
    with pytest.raises(ConfigError, match="contrast range is empty"):
        PhotometricBox(1.2, 0.8, 0, 0)
    with pytest.raises(ConfigError, match="brightness range is empty"):
        PhotometricBox(0.8, 1.2, 0.1, -0.1)
