"""Datasets: the built-in landing-pad generator and COCO keypoints folders."""

from usn_offline.data.coco import load_split, write_split
from usn_offline.data.dataset import KeypointDataset
from usn_offline.data.generator import SPLITS, GeneratorConfig, generate_dataset
from usn_offline.data.render import RenderConfig

__all__ = ["SPLITS", "GeneratorConfig", "KeypointDataset", "RenderConfig", "generate_dataset",
           "load_split", "write_split"]
