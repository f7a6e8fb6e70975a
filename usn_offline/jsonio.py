"""Reading the project's JSON files with errors that name the file (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path

from usn_offline.errors import UsnError


def read_json_object(path: Path, error: type[UsnError], label: str | None = None) -> dict:
    """Parse ``path`` as a JSON object; malformed content raises ``error`` naming ``label``
    (default: the path). The caller checks that the file exists, with its own message."""
    label = label or str(path)
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{label}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise error(f"{label}: expected a JSON object")
    return doc
