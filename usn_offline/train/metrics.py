"""Keypoint accuracy metrics: pixel error and PCK (percentage of correct keypoints)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from usn_offline.data.dataset import KeypointDataset
from usn_offline.runtime.preprocess import normalised_to_pixels, scale_keypoints
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
class ImagePixelAccuracy:
    """The same errors in the pixels of the user's stored images (each image's own scale
    from network input to stored size, per axis), and the PCK thresholds taken there."""

    mean_px_error: float
    median_px_error: float
    pck: dict[float, float]
    sizes: list[str]  # the stored image sizes, "WxH", most frequent first

    def to_dict(self) -> dict:
        return {"mean_px_error": self.mean_px_error, "median_px_error": self.median_px_error,
                "sizes": self.sizes, **{f"pck@{t:g}px": v for t, v in self.pck.items()}}


@dataclass
class EvaluationResult:
    """Accuracy of a model on one split, in pixels of the network input image;
    ``image_px`` the same in the stored images' own pixels (None when not known)."""

    num_images: int
    mean_px_error: float
    median_px_error: float
    pck: dict[float, float]
    per_keypoint_mean_px_error: dict[str, float] = field(default_factory=dict)
    split: str = "test"
    image_px: ImagePixelAccuracy | None = None

    def to_dict(self) -> dict:
        d = {
            "split": self.split,
            "num_images": self.num_images,
            "units": "network-input pixels (image_px: the stored images' pixels)",
            "mean_px_error": self.mean_px_error,
            "median_px_error": self.median_px_error,
            "per_keypoint_mean_px_error": self.per_keypoint_mean_px_error,
        }
        d.update({f"pck@{t:g}px": v for t, v in self.pck.items()})
        d["image_px"] = None if self.image_px is None else self.image_px.to_dict()
        return d


def image_pixel_accuracy(pred_px: np.ndarray, dataset: KeypointDataset, thresholds: tuple[float, ...]
                         ) -> ImagePixelAccuracy | None:
    """Errors in the stored images' pixels: prediction and label mapped back to each image's
    stored size by ``scale_keypoints`` (the map the dataset loader used)."""
    if dataset.source_hw is None:
        return None
    source_hw = np.asarray(dataset.source_hw)
    sizes, counts = np.unique(source_hw, axis=0, return_counts=True)
    err = np.empty(dataset.keypoints.shape[:2])
    for size in sizes:
        rows = (source_hw == size).all(axis=1)
        back = [scale_keypoints(k[rows], dataset.image_hw, tuple(size)) for k in (pred_px, dataset.keypoints)]
        err[rows] = keypoint_errors(*back)
    order = np.argsort(-counts, kind="stable")
    return ImagePixelAccuracy(mean_px_error=float(err.mean()), median_px_error=float(np.median(err)),
                              pck={float(t): float((err <= t).mean()) for t in thresholds},
                              sizes=[f"{sizes[i][1]}x{sizes[i][0]}" for i in order])


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
        image_px=image_pixel_accuracy(pred_px, dataset, thresholds),
    )


def evaluate_model(model: torch.nn.Module, dataset: KeypointDataset, device: torch.device | str = "cpu",
                   thresholds: tuple[float, ...] = DEFAULT_PCK_THRESHOLDS) -> EvaluationResult:
    return evaluate_predictions(predict_pixels(model, dataset, device), dataset, thresholds)


def evaluation_table(result: EvaluationResult, input_hw: tuple[int, int] | None = None) -> str:
    """The accuracy table; when the stored images are not at the network input size
    (``input_hw``), the errors and PCK in their own pixels follow, labelled so."""
    rows = [("split", result.split), ("images", str(result.num_images)),
            ("mean pixel error", f"{result.mean_px_error:.3f} px"),
            ("median pixel error", f"{result.median_px_error:.3f} px")]
    rows += [(f"PCK@{t:g}px", f"{100 * v:.2f} %") for t, v in result.pck.items()]
    rows += [(f"mean error {name}", f"{v:.3f} px") for name, v in result.per_keypoint_mean_px_error.items()]
    img = result.image_px
    if input_hw is not None:
        rows[1:1] = [("pixels", f"network input {input_hw[1]}x{input_hw[0]}")]
    if img is not None and input_hw is not None and img.sizes != [f"{input_hw[1]}x{input_hw[0]}"]:
        sizes = ", ".join(img.sizes[:3]) + (", ..." if len(img.sizes) > 3 else "")
        rows += [("image pixels: stored sizes", sizes),
                 ("mean pixel error (image px)", f"{img.mean_px_error:.3f} px"),
                 ("median pixel error (image px)", f"{img.median_px_error:.3f} px")]
        rows += [(f"PCK@{t:g}px (image px)", f"{100 * v:.2f} %") for t, v in img.pck.items()]
    return format_table(rows)
