"""Shared fixtures. DDS stays on loopback with a per-run domain id (set before rclpy loads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small generated dataset (COCO folder) shared by the tests that only read it."""
    from usn_offline.data import GeneratorConfig, generate_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(root, GeneratorConfig(num_train=96, num_val=24, num_test=24, seed=3), progress=False)
    return root


@pytest.fixture(scope="session")
def exported_bundle(tiny_dataset, tmp_path_factory) -> Path:
    """A small trained, certified and exported bundle (shared by runtime tests)."""
    import json

    from usn_offline.certify import CertifyConfig, certify_dataset
    from usn_offline.certify.report import report_to_dict, write_report
    from usn_offline.data import load_split
    from usn_offline.export import ExportConfig, write_bundle
    from usn_offline.models import model_config_for
    from usn_offline.perturb import PhotometricBox
    from usn_offline.train import TrainConfig, load_checkpoint, train_model

    root = tmp_path_factory.mktemp("bundle_fixture")
    ckpt = root / "m.pt"
    train, val = load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val")
    train_model(train, val, model_config_for("cnn7", widths=(4, 4, 8, 8, 8), hidden=32),
                TrainConfig(epochs=2, batch_size=16, device="cpu"), ckpt, progress=False)
    model, info = load_checkpoint(ckpt)
    test = load_split(tiny_dataset, "test")
    report = certify_dataset(model, test.subset(slice(0, 3)),
                             CertifyConfig(box=PhotometricBox(0.9, 1.1, -0.1, 0.1), delta=50.0), progress=False)
    cert = write_report(root / "cert.json", report_to_dict(report, ckpt, tiny_dataset, "test"))
    bundle = write_bundle(root / "bundle", model, info, ckpt, json.loads(cert.read_text()), test, train,
                          ExportConfig(build_engine=False))
    return bundle.root
