"""Certify a trained keypoint network on a dataset: per-image status and bounds, radii,
region maps, and the dataset-level certified region."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from usn_offline.certify.bab import BabConfig, Status, certify_boxes
from usn_offline.certify.bounds import PixelMap
from usn_offline.certify.errors import CertificationError
from usn_offline.certify.falsify import deviations_at
from usn_offline.certify.graph import Graph, lower
from usn_offline.certify.search import RadiusConfig, largest_certified_radius, region_edges, region_map
from usn_offline.certify.spec import KeypointProperty, Norm, Reference
from usn_offline.perturb import PhotometricBox

if TYPE_CHECKING:  # the data package (scikit-image, ...) is not needed to prove frames on a robot
    from usn_offline.data.dataset import KeypointDataset

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class ParallelConfig:
    """Where images are certified: here (``workers`` 1, no ``ray_address``) or on Ray
    workers, a local Ray instance of ``workers`` processes or the cluster at
    ``ray_address``; ``journal``: the JSON-lines file each finished image is appended to,
    from which ``resume`` continues an interrupted run."""

    workers: int = 1
    ray_address: str | None = None
    journal: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise CertificationError(f"workers must be >= 1, got {self.workers}")
        if self.resume and self.journal is None:
            raise CertificationError("resume needs a journal")


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
    network_hw: tuple[int, int] | None = None  # the network input the pixel figures are in
    image_hw: list[tuple[int, int]] | None = None  # each image's stored size (its own pixels)

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


def resolve_budgets(config: CertifyConfig, device: torch.device | str) -> CertifyConfig:
    """``config`` with its automatic budgets (0) replaced by what they are on ``device``'s
    kind, so that a report records the budget actually used (boxes, batch; never seconds)."""
    device = torch.device(device)
    if config.radius is not None and config.radius.max_boxes == 0:
        config = replace(config, radius=replace(config.radius, max_boxes=config.radius.budget(device)))
    if config.bab.batch_size == 0:
        config = replace(config, bab=replace(config.bab, batch_size=config.bab.batch_for(device)))
    return config


class ImageCertifier:
    """The per-image work of :func:`certify_dataset` against one lowered graph: made once
    per process (or Ray worker), then called for each image."""

    def __init__(self, model: torch.nn.Module, image_hw: tuple[int, int], num_keypoints: int,
                 config: CertifyConfig, device: torch.device | str = "cpu") -> None:
        self.dtype = DTYPES[config.dtype]
        h, w = image_hw
        self.graph: Graph = lower(model.eval(), (1, h, w), clip=config.clip, dtype=self.dtype, device=device)
        self.pixels = PixelMap.for_image(num_keypoints, h, w, self.dtype, device)
        self.config = resolve_budgets(config, self.graph.device)
        self.device, self.image_hw = device, (h, w)

    def deviation_at(self, image: np.ndarray, reference: torch.Tensor, a: float, b: float) -> float:
        """The largest keypoint deviation (pixels) from ``reference`` at the concrete (a, b)."""
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, self.dtype)[None, None]
        prop = KeypointProperty(reference.to(self.device, self.dtype), self.config.delta, self.config.norm)
        ab = (torch.tensor([a], dtype=self.dtype, device=self.device),
              torch.tensor([b], dtype=self.dtype, device=self.device))
        return float(deviations_at(self.graph, x, prop, self.pixels, *ab)[0])

    def certify(self, index: int, file_name: str, image: np.ndarray, reference: np.ndarray) -> ImageResult:
        """Certify one (H, W) image against its reference keypoints (pixels, flattened)."""
        config, t0 = self.config, time.perf_counter()
        if image.shape != self.image_hw or not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise CertificationError(f"the image must be {self.image_hw[0]}x{self.image_hw[1]} with finite values "
                                     f"in [0, 1], got shape {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, self.dtype)[None, None]
        prop = KeypointProperty(torch.as_tensor(reference, dtype=self.dtype, device=self.device), config.delta,
                                config.norm)
        roots = [config.box] + [PhotometricBox.symmetric(e, e) for e in config.eps_list]
        outcomes = certify_boxes(self.graph, x, prop, self.pixels, roots, config.bab)
        main = outcomes[0]
        result = ImageResult(
            index=index, file_name=file_name, status=main.status,
            reference_px=[float(v) for v in reference],
            lower_px=[float(v) for v in main.lower], upper_px=[float(v) for v in main.upper],
            counterexample=main.counterexample, counterexample_deviation_px=main.counterexample_deviation,
            boxes_bounded=sum(o.boxes_bounded for o in outcomes), seconds=0.0,
            certified_at_eps={f"{e:g}": o.status.value for e, o in zip(config.eps_list, outcomes[1:],
                                                                          strict=True)})
        if config.radius is not None:
            rad = largest_certified_radius(self.graph, x, prop, self.pixels, config.radius, config.bab)
            result.radius = rad.certified_eps if rad.certified_at_zero else None
            result.falsified_radius = rad.falsified_eps
        if config.region_grid is not None:
            rmap = region_map(self.graph, x, prop, self.pixels, config.box, config.region_grid, config.bab)
            result.region_status = rmap.status.tolist()
        result.seconds = time.perf_counter() - t0
        return result


def certify_dataset(model: torch.nn.Module, dataset: KeypointDataset, config: CertifyConfig,
                    device: torch.device | str = "cpu", progress: bool = True,
                    parallel: ParallelConfig | None = None) -> CertificationReport:
    """Certify every image of ``dataset`` (use ``dataset.subset`` to pick images): here, one
    image after the other, or on Ray workers (``parallel``), with results streamed to a
    journal from which an interrupted run resumes. The report is the same either way,
    apart from timings."""
    from usn_offline.certify.journal import Journal, run_fingerprint

    started = time.perf_counter()
    parallel = parallel or ParallelConfig()
    model = model.eval()
    refs = _references(model, dataset, config.reference, device)
    config = resolve_budgets(config, device)
    done: dict[int, ImageResult] = {}
    journal = None
    if parallel.journal is not None:
        journal = Journal(parallel.journal, run_fingerprint(model, dataset, refs, config))
        done = journal.open(resume=parallel.resume)
        if done:
            _check_resumed(done, model, dataset, refs, config, device)
    todo = [i for i in range(len(dataset)) if i not in done]
    bar = tqdm(total=len(dataset), initial=len(done), desc="certify", unit="img", disable=not progress)
    try:
        if parallel.workers <= 1 and parallel.ray_address is None:
            results = _certify_here(model, dataset, refs, config, device, todo)
        else:
            from usn_offline.certify.distributed import certify_on_ray

            results = certify_on_ray(model, dataset, refs, config, device, todo, parallel)
        for result in results:
            done[result.index] = result
            if journal is not None:
                journal.append(result)
            bar.update()
    finally:
        bar.close()
        if journal is not None:
            journal.close()
    edges = None
    if config.region_grid is not None:
        a_edges, b_edges = region_edges(config.box, config.region_grid)
        edges = (a_edges.tolist(), b_edges.tolist())
    stored = dataset.source_hw if dataset.source_hw is not None else [dataset.image_hw] * len(dataset)
    return CertificationReport(config=config, images=[done[i] for i in range(len(dataset))],
                               seconds=time.perf_counter() - started, region_edges=edges,
                               network_hw=tuple(dataset.image_hw),
                               image_hw=[(int(h), int(w)) for h, w in stored])


def _check_resumed(done: dict[int, ImageResult], model: torch.nn.Module, dataset: KeypointDataset,
                   refs: np.ndarray, config: CertifyConfig, device: torch.device | str) -> None:
    """Refuse journal entries whose claim their own figures do not bear out, so that an
    edited or damaged journal cannot turn an image into a certified one: a certified image's
    bounds must lie within delta of its reference, and a falsified image's counterexample
    must lie in the box and, run through the model again, break the property."""
    certifier = None
    for index, result in sorted(done.items()):
        where = f"journal entry of image {index}"
        if not 0 <= index < len(dataset) or result.file_name != dataset.file_names[index]:
            raise CertificationError(f"{where}: not an image of this run ({result.file_name!r}); remove the "
                                     "journal or run without --resume")
        reference = torch.as_tensor(refs[index], dtype=torch.float64)
        if result.reference_px != [float(v) for v in refs[index]]:
            raise CertificationError(f"{where}: its reference keypoints are not this run's")
        prop = KeypointProperty(reference, config.delta, config.norm)
        if result.status is Status.CERTIFIED:
            try:
                lo, hi = (torch.as_tensor(v, dtype=torch.float64) for v in (result.lower_px, result.upper_px))
            except (TypeError, ValueError) as exc:
                raise CertificationError(f"{where}: its bounds are not numbers ({exc})") from exc
            # The bounds are the envelope of every sub-box's; each sub-box was proved within
            # delta, so every coordinate of the envelope is (for L2 too, per coordinate).
            envelope = KeypointProperty(reference, config.delta, Norm.LINF)
            if (lo.shape != reference.shape or hi.shape != reference.shape or not torch.isfinite(lo).all()
                    or not torch.isfinite(hi).all() or not bool(envelope.verified(lo[None], hi[None]))):
                raise CertificationError(f"{where}: says certified, but its bounds are not within delta "
                                         f"{config.delta:g} px of its reference")
        elif result.status is Status.FALSIFIED:
            point = result.counterexample
            if (point is None or len(point) != 2 or not all(isinstance(v, (int, float)) for v in point)
                    or not config.box.contains(*point)):
                raise CertificationError(f"{where}: says falsified, but has no counterexample in the box")
            if certifier is None:
                certifier = ImageCertifier(model, dataset.image_hw, dataset.num_keypoints, config, device)
            deviation = certifier.deviation_at(dataset.images[index], reference, float(point[0]), float(point[1]))
            if not bool(prop.violates(torch.as_tensor(deviation))):
                raise CertificationError(f"{where}: says falsified, but its counterexample moves the keypoints "
                                         f"{deviation:.4g} px, within delta {config.delta:g} px")


def _certify_here(model, dataset, refs, config, device, todo):
    certifier = ImageCertifier(model, dataset.image_hw, dataset.num_keypoints, config, device)
    for i in todo:
        try:
            result = certifier.certify(i, dataset.file_names[i], dataset.images[i], refs[i])
        except Exception as exc:  # name the image; the finished ones are in the journal
            raise CertificationError(f"certification failed on image {i} ({dataset.file_names[i]}): "
                                     f"{type(exc).__name__}: {exc}") from exc
        yield result
