"""The certification journal: one JSON line per finished image, flushed as it finishes, so
that a run killed or cut off (a lost worker, a lost machine) resumes without redoing them.

The first line names the run by a fingerprint of everything a result depends on (model
weights, images, reference keypoints, certification settings, the verifier's own code); a
journal of another run is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from usn_offline import __version__
from usn_offline.certify.bab import Status
from usn_offline.certify.errors import CertificationError

if TYPE_CHECKING:
    from usn_offline.certify.engine import CertifyConfig, ImageResult
    from usn_offline.data.dataset import KeypointDataset

JOURNAL_KIND = "usn-certify-journal"
JOURNAL_VERSION = 1


def run_fingerprint(model: torch.nn.Module, dataset: KeypointDataset, references: np.ndarray,
                    config: CertifyConfig) -> str:
    """SHA-256 of what the per-image results depend on."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(np.ascontiguousarray(dataset.images).tobytes())
    digest.update(np.ascontiguousarray(references, dtype=np.float64).tobytes())
    digest.update("\n".join(dataset.file_names).encode())
    digest.update(repr(config).encode())
    # A verifier fixed between the cut-off run and its resumption must not inherit the
    # results of the one before: the code that computes and lowers the bounds counts too.
    digest.update(__version__.encode())
    for package in (Path(__file__).parent, Path(__file__).parent.parent / "perturb"):
        for source in sorted(package.glob("*.py")):
            digest.update(source.name.encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def result_to_json(result: ImageResult) -> dict:
    doc = dataclasses.asdict(result)
    doc["status"] = result.status.value
    return doc


def result_from_json(doc: dict) -> ImageResult:
    from usn_offline.certify.engine import ImageResult

    doc = dict(doc)
    doc["status"] = Status(doc["status"])
    if doc.get("counterexample") is not None:
        doc["counterexample"] = tuple(doc["counterexample"])
    return ImageResult(**doc)


class Journal:
    """Append-only per-image results of one certification run (see the module docstring)."""

    def __init__(self, path: Path | str, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._file = None

    def _header(self) -> str:
        return json.dumps({"kind": JOURNAL_KIND, "version": JOURNAL_VERSION, "fingerprint": self.fingerprint})

    def open(self, resume: bool) -> dict[int, ImageResult]:
        """Start the journal: continue it when ``resume`` and it is this run's (returning its
        finished images), else start it afresh. A line cut off by a kill is dropped."""
        done: dict[int, ImageResult] = {}
        lines = [self._header()]
        if resume and self.path.exists():
            raw = self.path.read_bytes().split(b"\n")
            complete = raw[:-1]  # the last piece has no newline: empty, or a cut-off line
            try:
                header = json.loads(complete[0]) if complete else None
            except ValueError:
                header = None
            if not isinstance(header, dict) or header.get("kind") != JOURNAL_KIND:
                raise CertificationError(f"{self.path} is not a certification journal: remove it or run "
                                         "without --resume")
            if header.get("fingerprint") != self.fingerprint:
                raise CertificationError(f"{self.path} is the journal of another run (the model, the images or "
                                         "the certification settings differ): remove it or run without --resume")
            for number, line in enumerate(complete[1:], start=2):
                try:
                    entry = json.loads(line)
                    result = result_from_json(entry["result"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise CertificationError(f"{self.path}, line {number}: not a journal entry ({exc})") from exc
                done[result.index] = result
                lines.append(line.decode())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(line + "\n" for line in lines))
        os.replace(partial, self.path)
        self._file = self.path.open("a")
        return done

    def append(self, result: ImageResult) -> None:
        self._file.write(json.dumps({"result": result_to_json(result)}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
