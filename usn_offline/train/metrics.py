"""Keypoint accuracy metrics: pixel error and PCK (percentage of correct keypoints)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from usn_offline.data.dataset import KeypointDataset
from usn_offline.runtime.preprocess import normalised_to_pixels
from usn_offline.tables import format_table

DEFAULT_PCK_THRESHOLDS: tuple[float, ...] = (2.0, 5.0)


@torch.no_grad()
def predict_normalised(model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu",
                       batch_size: int = 256) -> np.ndarray:
    """Network outputs for (N, H, W) images, as (N, K, 2) normalised coordinates."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        outputs.append(model(batch.unsqueeze(1).to(device)).float().cpu().numpy())
    out = np.concatenate(outputs)
    return out.reshape(len(out), -1, 2)


def predict_pixels(model: torch.nn.Module, dataset: KeypointDataset, device: torch.device | str = "cpu",
                   batch_size: int = 256) -> np.ndarray:
    h, w = dataset.image_hw
    return normalised_to_pixels(predict_normalised(model, dataset.images, device, batch_size), h, w)


def keypoint_errors(pred_px: np.ndarray, true_px: np.ndarray) -> np.ndarray:
    """Euclidean error per keypoint, (N, K)."""
    return np.linalg.norm(np.asarray(pred_px, np.float64) - np.asarray(true_px, np.float64), axis=-1)


@dataclass
class EvaluationResult:
    """Accuracy of a model on one split (pixels of the network input image)."""

    num_images: int
    mean_px_error: float
    median_px_error: float
    pck: dict[float, float]
    per_keypoint_mean_px_error: dict[str, float] = field(default_factory=dict)
    split: str = "test"

    def to_dict(self) -> dict:
        d = {
            "split": self.split,
            "num_images": self.num_images,
            "mean_px_error": self.mean_px_error,
            "median_px_error": self.median_px_error,
            "per_keypoint_mean_px_error": self.per_keypoint_mean_px_error,
        }
        d.update({f"pck@{t:g}px": v for t, v in self.pck.items()})
        return d


def evaluate_predictions(pred_px: np.ndarray, dataset: KeypointDataset,
                         thresholds: tuple[float, ...] = DEFAULT_PCK_THRESHOLDS) -> EvaluationResult:
    err = keypoint_errors(pred_px, dataset.keypoints)
    return EvaluationResult(
        num_images=len(dataset),
        mean_px_error=float(err.mean()),
        median_px_error=float(np.median(err)),
        pck={float(t): float((err <= t).mean()) for t in thresholds},
        per_keypoint_mean_px_error={n: float(err[:, i].mean()) for i, n in enumerate(dataset.keypoint_names)},
        split=dataset.split,
    )


def evaluate_model(model: torch.nn.Module, dataset: KeypointDataset, device: torch.device | str = "cpu",
                   thresholds: tuple[float, ...] = DEFAULT_PCK_THRESHOLDS) -> EvaluationResult:
    return evaluate_predictions(predict_pixels(model, dataset, device), dataset, thresholds)


def evaluation_table(result: EvaluationResult) -> str:
    rows = [("split", result.split), ("images", str(result.num_images)),
            ("mean pixel error", f"{result.mean_px_error:.3f} px"),
            ("median pixel error", f"{result.median_px_error:.3f} px")]
    rows += [(f"PCK@{t:g}px", f"{100 * v:.2f} %") for t, v in result.pck.items()]
    rows += [(f"mean error {name}", f"{v:.3f} px") for name, v in result.per_keypoint_mean_px_error.items()]
    return format_table(rows)
