"""The deployment bundle: loading and validation (torch-free, no pickle).

A bundle directory holds ``manifest.json`` (schema version, files with SHA-256 hashes,
input size, keypoint names, preprocessing), ``model.onnx``, ``certificate.json`` (the
certified region, delta, deployment gap, nominal image statistics, the SHA-256 of
``model.onnx``) and optionally ``model.engine``. :meth:`Bundle.load` refuses anything
corrupt, truncated, tampered with or mismatched, naming the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from usn_offline.errors import BundleError
from usn_offline.jsonio import read_json_object
from usn_offline.perturb import PhotometricBox
from usn_offline.runtime.hashing import sha256_file
from usn_offline.runtime.preprocess import PreprocessConfig

MANIFEST_SCHEMA_VERSION = 1
CERTIFICATE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CERTIFICATE = "certificate.json"
ONNX_MODEL = "model.onnx"
ENGINE = "model.engine"
# Bounds on the manifest's runtime fields, checked before anything is allocated from them
# (the model's own shapes are checked against them when a backend loads it).
MAX_INPUT_SIDE = 4096
MAX_KEYPOINTS = 1024


@dataclass(frozen=True)
class NominalStatistics:
    """Statistics of the training images the monitor compares each frame with."""

    mean_of_means: float
    std_of_means: float
    mean_of_stds: float
    std_of_stds: float
    num_images: int
    # 1st and 99th percentile of the per-image stds: the contrast of the scenes the model
    # was made for (runtime/scene_check.py); None in bundles exported before they existed.
    low_std: float | None = None
    high_std: float | None = None


@dataclass
class Bundle:
    root: Path
    manifest: dict
    certificate: dict
    preprocess: PreprocessConfig
    keypoint_names: tuple[str, ...]
    region: list[PhotometricBox]
    delta_px: float
    deployment_gap_px: float
    nominal: NominalStatistics
    model_sha256: str

    @property
    def onnx_path(self) -> Path:
        return self.root / ONNX_MODEL

    @property
    def engine_path(self) -> Path | None:
        path = self.root / ENGINE
        return path if ENGINE in self.manifest["files"] else None

    @property
    def effective_delta_px(self) -> float:
        """What the deployed backend guarantees: delta plus the measured deployment gap."""
        return self.delta_px + self.deployment_gap_px

    def in_region(self, a: float, b: float) -> bool:
        return any(box.contains(a, b) for box in self.region)

    def lighting_range(self, lighting: tuple[float, ...] = (0.0,) * 4) -> PhotometricBox:
        """The lighting range per-frame decisions cover: ``lighting`` (contrast min, max,
        brightness min, max), or the certificate's first box when it is all zero."""
        if len(lighting) != 4:
            raise BundleError(f"a lighting range needs 4 numbers (contrast min, max, brightness min, max), "
                              f"got {list(lighting)}")
        if not any(lighting):
            return self.region[0]
        a_lo, a_hi, b_lo, b_hi = (float(v) for v in lighting)
        if not (0 < a_lo <= a_hi and b_lo <= b_hi) or not all(map(math.isfinite, lighting)):
            raise BundleError(f"lighting range {list(lighting)}: needs 0 < contrast min <= max and "
                              "brightness min <= max, all finite")
        return PhotometricBox(a_lo, a_hi, b_lo, b_hi)

    @classmethod
    def load(cls, root: Path | str) -> Bundle:
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"bundle directory not found: {root}")
        manifest = _read_json(root, MANIFEST)
        _check_version(manifest, MANIFEST_SCHEMA_VERSION, MANIFEST)
        files = _require(manifest, "files", dict, MANIFEST)
        for required in (ONNX_MODEL, CERTIFICATE):
            if required not in files:
                raise BundleError(f"{MANIFEST}: does not list {required}")
        for name, entry in files.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise BundleError(f"{MANIFEST}: entry for {name} has no sha256")
            if Path(name).name != name:
                raise BundleError(f"{MANIFEST}: file name {name!r} must not contain a path")
            path = root / name
            if not path.is_file():
                raise BundleError(f"bundle is missing {name} (listed in {MANIFEST})")
            if path.stat().st_size != entry.get("bytes", path.stat().st_size):
                raise BundleError(f"{name}: size {path.stat().st_size} bytes, manifest says {entry['bytes']} "
                                  "(truncated or replaced)")
            if sha256_file(path) != entry["sha256"]:
                raise BundleError(f"{name}: SHA-256 does not match {MANIFEST} (file modified or corrupt)")
        certificate = _read_json(root, CERTIFICATE)
        _check_version(certificate, CERTIFICATE_SCHEMA_VERSION, CERTIFICATE)
        model_sha = _require(certificate, "model_sha256", str, CERTIFICATE)
        if model_sha != files[ONNX_MODEL]["sha256"]:
            raise BundleError(f"{CERTIFICATE} was issued for another model (model_sha256 {model_sha[:12]}... "
                              f"!= {ONNX_MODEL} {files[ONNX_MODEL]['sha256'][:12]}...)")
        _check_engine_binding(files, certificate)
        try:
            preprocess = PreprocessConfig.from_dict(_require(manifest, "preprocessing", dict, MANIFEST))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{MANIFEST}: invalid preprocessing ({exc})") from exc
        size = (preprocess.input_height, preprocess.input_width)
        if min(size) < 1 or max(size) > MAX_INPUT_SIDE:
            raise BundleError(f"{MANIFEST}: input size {size[0]}x{size[1]} must lie within 1..{MAX_INPUT_SIDE} "
                              "pixels per side")
        names = tuple(_require(manifest, "keypoint_names", list, MANIFEST))
        if not names or len(names) > MAX_KEYPOINTS or not all(isinstance(n, str) and len(n) <= 256 for n in names):
            raise BundleError(f"{MANIFEST}: keypoint_names must be a list of 1..{MAX_KEYPOINTS} strings "
                              "(at most 256 characters each)")
        delta = _number(certificate, "delta_px", CERTIFICATE, minimum=0.0)
        gap = _number(certificate, "deployment_gap_px", CERTIFICATE, minimum=0.0)
        region = _region(certificate)
        nominal = _nominal(certificate)
        return cls(root=root, manifest=manifest, certificate=certificate, preprocess=preprocess,
                   keypoint_names=names, region=region, delta_px=delta, deployment_gap_px=gap,
                   nominal=nominal, model_sha256=model_sha)


def _check_engine_binding(files: dict, certificate: dict) -> None:
    """A listed engine must be the one the certificate names (its gap is in the certificate)."""
    engine = certificate.get("engine")
    if ENGINE in files:
        if not isinstance(engine, dict) or engine.get("sha256") != files[ENGINE]["sha256"]:
            raise BundleError(f"{MANIFEST} lists {ENGINE} but {CERTIFICATE} names "
                              f"{'no engine' if not isinstance(engine, dict) else 'another engine'}: "
                              "rebuild it with 'usn-offline build-engine'")
    elif engine is not None:
        raise BundleError(f"{CERTIFICATE} names an engine that {MANIFEST} does not list")


def _read_json(root: Path, name: str) -> dict:
    path = root / name
    if not path.is_file():
        raise BundleError(f"bundle is missing {name}")
    return read_json_object(path, BundleError, name)


def _check_version(doc: dict, expected: int, name: str) -> None:
    if type(doc.get("schema_version")) is not int or doc.get("schema_version") != expected:  # not true
        raise BundleError(f"{name}: unsupported schema_version {doc.get('schema_version')!r} "
                          f"(this tool reads {expected})")


def _require(doc: dict, key: str, kind: type, name: str):
    if key not in doc:
        raise BundleError(f"{name}: missing field '{key}'")
    value = doc[key]
    if not isinstance(value, kind):
        raise BundleError(f"{name}: field '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _number(doc: dict, key: str, name: str, minimum: float | None = None) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BundleError(f"{name}: field '{key}' must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise BundleError(f"{name}: field '{key}' must be >= {minimum}, got {value}")
    return float(value)


def _region(certificate: dict) -> list[PhotometricBox]:
    region = _require(certificate, "region", dict, CERTIFICATE)
    boxes = region.get("boxes")
    if not isinstance(boxes, list) or not boxes:
        raise BundleError(f"{CERTIFICATE}: region.boxes must be a non-empty list")
    out = []
    for i, box in enumerate(boxes):
        if not isinstance(box, dict):
            raise BundleError(f"{CERTIFICATE}: region.boxes[{i}] must be an object")
        vals = [_number(box, k, f"{CERTIFICATE} region.boxes[{i}]") for k in ("a_lo", "a_hi", "b_lo", "b_hi")]
        if vals[0] > vals[1] or vals[2] > vals[3] or vals[0] < 0:
            raise BundleError(f"{CERTIFICATE}: region.boxes[{i}] is empty or has negative contrast: {vals}")
        out.append(PhotometricBox(*vals))
    return out


def _nominal(certificate: dict) -> NominalStatistics:
    stats = _require(certificate, "nominal_statistics", dict, CERTIFICATE)
    name = f"{CERTIFICATE} nominal_statistics"
    values = {k: _number(stats, k, name, minimum=0.0)
              for k in ("mean_of_means", "std_of_means", "mean_of_stds", "std_of_stds")}
    if values["mean_of_means"] > 1 or values["mean_of_stds"] <= 0:
        raise BundleError(f"{name}: intensities must lie in [0, 1] with a positive mean std")
    count = stats.get("num_images")
    if type(count) is not int or count < 1:
        raise BundleError(f"{name}: num_images must be a positive integer")
    spread = {k: _number(stats, k, name, minimum=0.0) for k in ("low_std", "high_std") if k in stats}
    if len(spread) == 1 or (spread and spread["low_std"] > spread["high_std"]):
        raise BundleError(f"{name}: low_std and high_std come together, low_std <= high_std")
    return NominalStatistics(**values, num_images=count, **spread)
