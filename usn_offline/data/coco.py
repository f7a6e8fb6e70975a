"""COCO keypoints folders: the on-disk dataset format (images + annotations JSON).

Layout::

    root/images/<split>/<file>.png
    root/annotations/<split>.json   # COCO "person_keypoints"-style file, one per split

Keypoints are stored as [x, y, v] triples in pixels of the stored image, using the
pixel-centre convention of :mod:`usn_offline.runtime.preprocess` (stated in ``info``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath

import cv2
import numpy as np

from usn_offline.data.augmentation import GeometricAugmentation, parse_augmentation
from usn_offline.data.dataset import KeypointDataset
from usn_offline.errors import DatasetError
from usn_offline.jsonio import loads_strict, read_json_object
from usn_offline.runtime.image_decode import compressed_size, opencv_to_rgb
from usn_offline.runtime.preprocess import PreprocessConfig, preprocess, scale_keypoints

log = logging.getLogger(__name__)

COORDINATE_CONVENTION = "pixel centres at integer coordinates (OpenCV); image spans [-0.5, W-0.5]"


def default_input_side(root: Path | str, split: str = "train", largest: int = 128, fallback: int = 64
                       ) -> tuple[int, str]:
    """The network input side to train at when none is given, and why: the split's image
    side when its images are square and at most ``largest`` px (no resampling), else
    ``fallback``."""
    size = stored_image_size(root, split)
    if size is None:
        return fallback, f"the {split} annotations do not state the images' size"
    h, w = size
    if h != w:
        return fallback, f"the {split} images are {w}x{h}, not square"
    if h > largest:
        return fallback, f"the {split} images are {w}x{h}, larger than {largest}x{largest}"
    return h, f"the {split} images' own size"


def annotation_path(root: Path | str, split: str) -> Path:
    return Path(root) / "annotations" / f"{split}.json"


def stored_image_size(root: Path | str, split: str) -> tuple[int, int] | None:
    """(height, width) the split's first image is stored at, as its annotations say; None
    when they do not say (the loader reports malformed files with its own errors)."""
    path = annotation_path(root, split)
    if not path.is_file():
        return None
    try:
        first = (loads_strict(path.read_text()).get("images") or [{}])[0]
        size = first.get("height"), first.get("width")
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, RecursionError):
        return None
    return size if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size) else None


def write_split(
    root: Path | str,
    split: str,
    images: list[np.ndarray],
    keypoints: np.ndarray,
    keypoint_names: tuple[str, ...],
    skeleton: tuple[tuple[int, int], ...] = (),
    info: dict | None = None,
    augmentation: dict | None = None,
) -> Path:
    """Write uint8 grayscale images and their (N, K, 2) pixel keypoints as a COCO split
    (``augmentation``: the category's declaration, :mod:`usn_offline.data.augmentation`)."""
    root = Path(root)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    coco_images, coco_annotations = [], []
    for i, (image, kps) in enumerate(zip(images, keypoints, strict=True)):
        file_name = f"{split}/{split}_{i:06d}.png"
        if not cv2.imwrite(str(root / "images" / file_name), image):
            raise DatasetError(f"cannot write image {root / 'images' / file_name}")
        h, w = image.shape[:2]
        coco_images.append({"id": i, "file_name": file_name, "height": h, "width": w})
        x0, y0 = kps.min(axis=0)
        x1, y1 = kps.max(axis=0)
        flat = [v for x, y in kps for v in (float(x), float(y), 2)]
        coco_annotations.append({
            "id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
            "keypoints": flat, "num_keypoints": len(kps),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float((x1 - x0) * (y1 - y0)),
        })
    doc = {
        "info": {"description": f"usn_offline keypoint dataset, split '{split}'",
                 "coordinate_convention": COORDINATE_CONVENTION, **(info or {})},
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [{"id": 1, "name": "target", "supercategory": "target",
                        "keypoints": list(keypoint_names),
                        "skeleton": [list(e) for e in skeleton],
                        **({"augmentation": augmentation} if augmentation is not None else {})}],
    }
    # Images an earlier, larger write of this split left behind (our own names only: the
    # folder may hold the user's files too) would sit beside the split as if part of it.
    written = {Path(entry["file_name"]).name for entry in coco_images}
    for stale in image_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        if stale.name not in written:
            stale.unlink()
    path = annotation_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    doc = read_json_object(path, DatasetError)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DatasetError(f"{path}: missing or invalid '{key}' list")
    return doc


# Larger images are refused from their header, before decoding (a 389 KB PNG can declare
# 20000 x 20000 pixels: 28 s and 3.7 GB to decode).
MAX_IMAGE_PIXELS = 4096 * 4096


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"image file not found: {path}")
    with open(path, "rb") as f:
        size = compressed_size(f.read(1 << 24))  # a JPEG's APPn segments may run past 64 KiB
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{path}: declares {size[0]}x{size[1]} pixels, over the limit of {MAX_IMAGE_PIXELS}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise DatasetError(f"cannot decode image (corrupt or unsupported format): {path}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():  # a float TIFF or EXR
        raise DatasetError(f"{path}: float image contains NaN or infinite pixels")
    return opencv_to_rgb(image)


def _is_id(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _check_file_name(name: object, path: Path) -> None:
    """A file name inside the dataset's images/ folder: relative, without '..'."""
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{path}: file_name must be a non-empty string, got {str(name)[:40]}")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or PureWindowsPath(name).drive or ".." in parts.parts:
        raise DatasetError(f"{path}: file_name {name!r} must be a path inside the dataset's images/ folder "
                           "(relative, without '..')")


def read_keypoint_names(root: Path | str, split: str) -> tuple[str, ...]:
    doc = _read_json(annotation_path(root, split))
    return _category(doc, annotation_path(root, split))[1]


def _category(doc: dict, path: Path) -> tuple[int, tuple[str, ...], GeometricAugmentation]:
    """The one keypoint category: its id, keypoint names and declared augmentation."""
    cats = [c for c in doc["categories"] if isinstance(c, dict) and c.get("keypoints")]
    if len(cats) != 1:
        raise DatasetError(f"{path}: expected exactly one category with 'keypoints', found {len(cats)}")
    names = cats[0]["keypoints"]
    if not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{path}: category keypoint names must be strings")
    declared = cats[0].get("augmentation")
    augmentation = GeometricAugmentation() if declared is None else parse_augmentation(declared, tuple(names),
                                                                                       str(path))
    return cats[0].get("id", 1), tuple(names), augmentation


def load_split(
    root: Path | str,
    split: str,
    preprocess_config: PreprocessConfig | None = None,
    expected_keypoints: int | None = None,
    min_visibility: int = 2,
) -> KeypointDataset:
    """Load one split, preprocessing every image to the network input size.

    Images without exactly one annotation whose keypoints all have a COCO visibility flag
    v >= ``min_visibility`` are skipped and counted in the log (COCO: v = 2 labelled and
    visible, 1 labelled but not visible, 0 not labelled; only v = 2 counts by default);
    anything malformed raises :class:`DatasetError` naming the file.
    """
    if min_visibility not in (1, 2):
        raise DatasetError(f"min_visibility must be 1 or 2 (COCO visibility flags), got {min_visibility}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    path = annotation_path(root, split)
    doc = _read_json(path)
    category_id, names, augmentation = _category(doc, path)
    k = len(names)
    if expected_keypoints is not None and k != expected_keypoints:
        raise DatasetError(f"{path}: has {k} keypoints per object, the model expects {expected_keypoints}")

    by_image: dict[int | str, list[dict]] = {}
    for ann in doc["annotations"]:
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DatasetError(f"{path}: annotation without 'image_id': {str(ann)[:80]}")
        if not _is_id(ann["image_id"]):
            raise DatasetError(f"{path}: annotation image_id must be an integer or a string, got "
                               f"{str(ann['image_id'])[:40]}")
        if ann.get("category_id", category_id) == category_id:
            by_image.setdefault(ann["image_id"], []).append(ann)

    skipped: Counter[str] = Counter()
    images, keypoints, files, source_hw = [], [], [], []
    config = preprocess_config
    seen_ids: set[int | str] = set()
    for entry in doc["images"]:
        if not isinstance(entry, dict) or "file_name" not in entry or "id" not in entry:
            raise DatasetError(f"{path}: image entry without 'id'/'file_name': {str(entry)[:80]}")
        if not _is_id(entry["id"]):
            raise DatasetError(f"{path}: image id must be an integer or a string, got {str(entry['id'])[:40]}")
        if entry["id"] in seen_ids:  # its annotations would silently label another image
            raise DatasetError(f"{path}: duplicate image id {entry['id']!r}")
        seen_ids.add(entry["id"])
        _check_file_name(entry["file_name"], path)
        anns = by_image.get(entry["id"], [])
        if len(anns) != 1:
            skipped["no annotation" if not anns else "several annotations"] += 1
            continue
        raw = anns[0].get("keypoints")
        if not isinstance(raw, list) or len(raw) != 3 * k:
            got = len(raw) // 3 if isinstance(raw, list) else "no"
            raise DatasetError(
                f"{path}: annotation {anns[0].get('id')} of image '{entry['file_name']}' has "
                f"{got} keypoints, expected {k}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            raise DatasetError(f"{path}: annotation {anns[0].get('id')} of image '{entry['file_name']}': "
                               "keypoints must be numbers")
        triples = np.asarray(raw, dtype=np.float64).reshape(k, 3)
        if not np.isfinite(triples).all():
            raise DatasetError(f"{path}: annotation {anns[0].get('id')} of image '{entry['file_name']}': "
                               "keypoints must be finite (NaN or infinity found)")
        if np.any(triples[:, 2] < min_visibility):
            skipped["keypoint not labelled" if np.any(triples[:, 2] <= 0) else "keypoint labelled but not visible"] += 1
            continue
        image_path = root / "images" / entry["file_name"]
        image = _read_image(image_path)
        h, w = image.shape[:2]
        x, y = triples[:, 0], triples[:, 1]
        outside = (x < -0.5) | (x > w - 0.5) | (y < -0.5) | (y > h - 0.5)
        if outside.any():
            i = int(np.argmax(outside))
            raise DatasetError(f"{path}: annotation {anns[0].get('id')} of image '{entry['file_name']}' "
                               f"(id {entry['id']!r}): keypoint {names[i]} at "
                               f"({triples[i, 0]:g}, {triples[i, 1]:g}) lies outside the {w}x{h} image")
        if config is None:
            config = PreprocessConfig(input_height=image.shape[0], input_width=image.shape[1])
        try:
            net_image = preprocess(image, config)
        except ValueError as exc:
            raise DatasetError(f"{image_path}: {exc}") from exc
        kps = scale_keypoints(triples[:, :2], image.shape[:2], (config.input_height, config.input_width))
        images.append(net_image)
        keypoints.append(kps)
        files.append(entry["file_name"])
        source_hw.append(image.shape[:2])

    for reason, count in skipped.items():
        log.warning("%s: skipped %d image(s): %s", path, count, reason)
    if not images:
        raise DatasetError(f"{path}: split '{split}' has no usable images"
                           + (f" (skipped: {dict(skipped)})" if skipped else ""))
    return KeypointDataset(
        images=np.stack(images).astype(np.float32),
        keypoints=np.stack(keypoints).astype(np.float32),
        keypoint_names=names,
        file_names=tuple(files),
        split=split,
        source_hw=np.asarray(source_hw, dtype=np.int64),
        augmentation=augmentation,
    )
