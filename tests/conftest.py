"""Shared fixtures. DDS stays on loopback with a per-run domain id (set before rclpy loads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from usn_offline.runtime.dds import large_frame_environment

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
# The shipped Fast DDS profile (camera-size frames over SENSOR_DATA QoS), as the Makefile and
# launch file set it; before any participant exists, since Fast DDS reads it once per process.
for _name, _value in large_frame_environment().items():
    os.environ.setdefault(_name, _value)

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
def tiny_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    """A small CNN7 trained for 3 epochs on the tiny dataset: the one model of the tests that
    need a trained network but not an accurate one (certification, export, pruning, Ray)."""
    from usn_offline.data import load_split
    from usn_offline.models import model_config_for
    from usn_offline.train import TrainConfig, train_model

    path = tmp_path_factory.mktemp("tiny_model") / "m.pt"
    train_model(load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val"),
                model_config_for("cnn7", widths=(4, 4, 8, 8, 8), hidden=32),
                TrainConfig(epochs=3, batch_size=16, device="cpu"), path, progress=False)
    return path


@pytest.fixture(scope="session")
def exported_bundle(tiny_dataset, tmp_path_factory) -> Path:
    """A trained (~3 px mean error at 64x64), certified and exported bundle, shared by the
    runtime and node tests (~30 s on 2 idle cores: 2000 generated images, 16 epochs of a
    narrow CNN7).

    This plain ReLU stack first sits on a plateau (predicting the mean keypoints, ~11 px)
    and leaves it after a number of epochs that depends on the training trajectory, hence
    on the CPU's float kernels. At lr 3e-3 some trajectories never left it; at 1.5e-3 with
    batches of 16, 8 of 8 training seeds left it at the third epoch and ended at 2.7-3.4 px
    on the node test's frames (the seed stands in for another CPU's trajectory)."""

    from usn_offline.certify import CertifyConfig, certify_dataset
    from usn_offline.certify.report import load_report, report_to_dict, write_report
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
                TrainConfig(epochs=16, batch_size=16, lr=1.5e-3, device="cpu"), ckpt, progress=False)
    model, info = load_checkpoint(ckpt)
    test = load_split(data, "test")
    report = certify_dataset(model, test.subset(slice(0, 3)),
                             CertifyConfig(box=PhotometricBox(0.9, 1.1, -0.1, 0.1), delta=50.0), progress=False)
    cert = write_report(root / "cert.json", report_to_dict(report, ckpt, data, "test"))
    bundle = write_bundle(root / "bundle", model, info, ckpt, load_report(cert), test, train,
                          ExportConfig(build_engine=False))
    return bundle.root
