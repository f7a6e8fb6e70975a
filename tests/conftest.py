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
