"""Certify a trained keypoint network on a dataset: per-image status and bounds, radii,
region maps, and the dataset-level certified region."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from usn_offline.certify.bab import BabConfig, Status, certify_boxes
from usn_offline.certify.bounds import PixelMap
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.graph import Graph, lower
from usn_offline.certify.search import RadiusConfig, largest_certified_radius, region_map
from usn_offline.certify.spec import KeypointProperty, Norm, Reference
from usn_offline.perturb import PhotometricBox

if TYPE_CHECKING:  # the data package (scikit-image, ...) is not needed to prove frames on a robot
    from usn_offline.data.dataset import KeypointDataset

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class CertifyConfig:
    box: PhotometricBox
    delta: float = 2.0
    norm: Norm = Norm.LINF
    reference: Reference = Reference.PREDICTION
    clip: bool = True
    bab: BabConfig = field(default_factory=BabConfig)
    radius: RadiusConfig | None = None
    eps_list: tuple[float, ...] = ()
    region_grid: tuple[int, int] | None = None
    coverage: float = 0.95
    dtype: str = "float64"

    def __post_init__(self) -> None:
        if not (self.delta >= 0 and math.isfinite(self.delta)):
            raise CertificationError(f"delta must be a finite number >= 0 pixels, got {self.delta}")
        if not 0 < self.coverage <= 1:
            raise CertificationError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.dtype not in DTYPES:
            raise CertificationError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype}")
        if any(not 0 <= e <= 1 for e in self.eps_list):
            raise CertificationError(f"every eps must be in [0, 1], got {self.eps_list}")
        object.__setattr__(self, "norm", Norm(self.norm))
        object.__setattr__(self, "reference", Reference(self.reference))


@dataclass
class ImageResult:
    index: int
    file_name: str
    status: Status
    reference_px: list[float]
    lower_px: list[float]
    upper_px: list[float]
    counterexample: tuple[float, float] | None
    counterexample_deviation_px: float | None
    boxes_bounded: int
    seconds: float
    radius: float | None = None
    falsified_radius: float | None = None
    certified_at_eps: dict[str, str] = field(default_factory=dict)
    region_status: list[list[str]] | None = None


@dataclass
class CertificationReport:
    config: CertifyConfig
    images: list[ImageResult]
    seconds: float
    region_edges: tuple[list[float], list[float]] | None = None

    def count(self, status: Status) -> int:
        return sum(r.status is status for r in self.images)

    def certified_fraction_at(self) -> dict[float, float]:
        n = len(self.images)
        out = {}
        for eps in self.config.eps_list:
            key = f"{eps:g}"
            out[eps] = sum(r.certified_at_eps.get(key) == Status.CERTIFIED.value for r in self.images) / n
        return out

    def radius_at_coverage(self) -> float | None:
        """Largest eps whose symmetric box is certified for >= coverage of the images."""
        if self.config.radius is None or not self.images:
            return None
        # An image not certified even at eps = 0 has no radius at all.
        radii = sorted((r.radius if r.radius is not None else -math.inf for r in self.images), reverse=True)
        value = radii[math.ceil(self.config.coverage * len(radii)) - 1]
        return None if value == -math.inf else value

    def region_fraction(self) -> np.ndarray | None:
        maps = [r.region_status for r in self.images if r.region_status is not None]
        if not maps:
            return None
        return np.mean([np.array(m) == Status.CERTIFIED.value for m in maps], axis=0)


def _references(model: torch.nn.Module, dataset: KeypointDataset, reference: Reference,
                device: torch.device | str) -> np.ndarray:
    from usn_offline.train.metrics import predict_pixels

    if reference is Reference.GROUND_TRUTH:
        return dataset.keypoints.reshape(len(dataset), -1).astype(np.float64)
    return predict_pixels(model, dataset, device).reshape(len(dataset), -1)


def certify_dataset(model: torch.nn.Module, dataset: KeypointDataset, config: CertifyConfig,
                    device: torch.device | str = "cpu", progress: bool = True) -> CertificationReport:
    """Certify every image of ``dataset`` (use ``dataset.subset`` to pick images)."""
    started = time.perf_counter()
    model = model.eval()
    dtype = DTYPES[config.dtype]
    h, w = dataset.image_hw
    graph: Graph = lower(model, (1, h, w), clip=config.clip, dtype=dtype, device=device)
    pixels = PixelMap.for_image(dataset.num_keypoints, h, w, dtype, device)
    refs = _references(model, dataset, config.reference, device)
    # Record the budget actually used (boxes, depth, batch; never seconds), not "auto" (0).
    if config.radius is not None and config.radius.max_boxes == 0:
        config = replace(config, radius=replace(config.radius, max_boxes=config.radius.budget(graph.device)))
    if config.bab.batch_size == 0:
        config = replace(config, bab=replace(config.bab, batch_size=config.bab.batch_for(graph.device)))
    results = []
    edges = None
    for i in tqdm(range(len(dataset)), desc="certify", unit="img", disable=not progress):
        t0 = time.perf_counter()
        image = torch.from_numpy(dataset.images[i]).to(device, dtype)[None, None]
        prop = KeypointProperty(torch.as_tensor(refs[i], dtype=dtype, device=device), config.delta, config.norm)
        roots = [config.box] + [PhotometricBox.symmetric(e, e) for e in config.eps_list]
        outcomes = certify_boxes(graph, image, prop, pixels, roots, config.bab)
        main = outcomes[0]
        result = ImageResult(
            index=i, file_name=dataset.file_names[i], status=main.status,
            reference_px=[float(v) for v in refs[i]],
            lower_px=[float(v) for v in main.lower], upper_px=[float(v) for v in main.upper],
            counterexample=main.counterexample, counterexample_deviation_px=main.counterexample_deviation,
            boxes_bounded=sum(o.boxes_bounded for o in outcomes), seconds=0.0,
            certified_at_eps={f"{e:g}": o.status.value for e, o in zip(config.eps_list, outcomes[1:],
                                                                          strict=True)})
        if config.radius is not None:
            rad = largest_certified_radius(graph, image, prop, pixels, config.radius, config.bab)
            result.radius = rad.certified_eps if rad.certified_at_zero else None
            result.falsified_radius = rad.falsified_eps
        if config.region_grid is not None:
            rmap = region_map(graph, image, prop, pixels, config.box, config.region_grid, config.bab)
            result.region_status = rmap.status.tolist()
            edges = (rmap.a_edges.tolist(), rmap.b_edges.tolist())
        result.seconds = time.perf_counter() - t0
        results.append(result)
    return CertificationReport(config=config, images=results, seconds=time.perf_counter() - started,
                               region_edges=edges)
