"""Export a checkpoint to ONNX with a static input shape and metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch

from usn_offline import __version__
from usn_offline.errors import BundleError
from usn_offline.models import KeypointNet
from usn_offline.train.checkpoint import CheckpointInfo

# TensorRT 8.6 parses opsets up to 17; TensorRT 10 reads it too.
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "keypoints"


def export_onnx(model: KeypointNet, info: CheckpointInfo, path: Path | str) -> Path:
    """Write ``model`` as ONNX: input ``image`` (1, C, H, W) float32 in [0, 1], output
    ``keypoints`` (1, 2K) normalised (x0, y0, x1, ...); preprocessing and keypoint names
    in the metadata. Checked with ``onnx.checker``."""
    path = Path(path)
    model = model.cpu().eval()
    cfg = info.model
    example = torch.zeros(1, cfg.in_channels, cfg.input_height, cfg.input_width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is legacy
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True)
    proto = onnx.load(str(path))
    metadata = {
        "usn_offline_version": __version__,
        "preprocessing": json.dumps(info.preprocess.to_dict()),
        "keypoint_names": json.dumps(list(info.keypoint_names)),
        "model_config": json.dumps(cfg.to_dict()),
        "output_convention": "normalised u = 2 (x + 0.5) / W - 1, pairs (x, y) per keypoint",
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "usn_offline"
    proto.producer_version = __version__
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BundleError(f"exported ONNX model failed onnx.checker: {exc}") from exc
    onnx.save(proto, str(path))
    return path
