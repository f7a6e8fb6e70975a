"""Shared fixtures. DDS stays on loopback with a per-run domain id (set before rclpy loads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))

REPO = Path(__file__).resolve().parents[1]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _cuda_available(), reason="no CUDA device here (run on a GPU machine to check the CUDA path)"))])
def device(request) -> str:
    """Torch device of the tests that must hold on CPU and CUDA alike (CUDA skipped without a GPU)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small generated dataset (COCO folder) shared by the tests that only read it."""
    from usn_offline.data import GeneratorConfig, generate_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(root, GeneratorConfig(num_train=96, num_val=24, num_test=24, seed=3), progress=False)
    return root


@pytest.fixture(scope="session")
def exported_bundle(tiny_dataset, tmp_path_factory) -> Path:
    """A trained (~5 px mean error at 64x64), certified and exported bundle, shared by the
    runtime and node tests (~25 s: 2000 generated images, 12 epochs of a narrow CNN7)."""
    import json

    from usn_offline.certify import CertifyConfig, certify_dataset
    from usn_offline.certify.report import report_to_dict, write_report
    from usn_offline.data import GeneratorConfig, generate_dataset, load_split
    from usn_offline.export import ExportConfig, write_bundle
    from usn_offline.models import model_config_for
    from usn_offline.perturb import PhotometricBox
    from usn_offline.train import TrainConfig, load_checkpoint, train_model

    root = tmp_path_factory.mktemp("bundle_fixture")
    ckpt = root / "m.pt"
    data = root / "data"
    generate_dataset(data, GeneratorConfig(num_train=2000, num_val=24, num_test=24, seed=3), progress=False)
    train, val = load_split(data, "train"), load_split(data, "val")
    train_model(train, val, model_config_for("cnn7", widths=(8, 16, 16, 32, 32), hidden=128),
                TrainConfig(epochs=12, batch_size=32, lr=3e-3, device="cpu"), ckpt, progress=False)
    model, info = load_checkpoint(ckpt)
    test = load_split(data, "test")
    report = certify_dataset(model, test.subset(slice(0, 3)),
                             CertifyConfig(box=PhotometricBox(0.9, 1.1, -0.1, 0.1), delta=50.0), progress=False)
    cert = write_report(root / "cert.json", report_to_dict(report, ckpt, data, "test"))
    bundle = write_bundle(root / "bundle", model, info, ckpt, json.loads(cert.read_text()), test, train,
                          ExportConfig(build_engine=False))
    return bundle.root
