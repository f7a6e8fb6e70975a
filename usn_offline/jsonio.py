"""Reading the project's JSON files with errors that name the file (torch-free)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from usn_offline.errors import UsnError

# Our files hold counts, sizes and hashes: an integer of more digits than this is an
# attack or corruption (10**400 would overflow every float conversion downstream).
_MAX_INT_DIGITS = 30


class _Unacceptable(ValueError):
    pass


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _Unacceptable(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Unacceptable(f"the number {text} overflows a float")
    return value


def _constant(name: str) -> float:
    raise _Unacceptable(f"{name} is not a JSON number")


# Deeper nesting is refused before parsing: the C parser recurses per level, and where a
# library has raised the recursion limit it overflows the C stack (a segfault, seen with
# 100000 levels) instead of raising RecursionError. Our files nest a handful of levels.
MAX_DEPTH = 100
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (strings skipped)."""
    codes = np.frombuffer(_STRING.sub("", text).encode("utf-8", "replace"), dtype=np.uint8)
    if codes.size == 0:
        return 0
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(codes, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(steps).max(initial=0))


def loads_strict(text: str) -> object:
    """``json.loads`` that refuses NaN/Infinity, numbers that overflow a float and
    integers of more than 30 digits (ValueError), and nesting deeper than MAX_DEPTH
    (RecursionError)."""
    if nesting_depth(text) > MAX_DEPTH:
        raise RecursionError(f"nested more than {MAX_DEPTH} levels deep")
    return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)


def read_json_object(path: Path, error: type[UsnError], label: str | None = None) -> dict:
    """Parse ``path`` as a JSON object; malformed content raises ``error`` naming ``label``
    (default: the path). The caller checks that the file exists, with its own message."""
    label = label or str(path)
    try:
        doc = loads_strict(Path(path).read_text())
    except _Unacceptable as exc:
        raise error(f"{label}: not acceptable JSON ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{label}: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise error(f"{label}: not acceptable JSON (nested too deeply)") from exc
    if not isinstance(doc, dict):
        raise error(f"{label}: expected a JSON object")
    return doc


def finite_only(doc: object) -> object:
    """``doc`` with every NaN or infinite float replaced by None (null): JSON has no NaN, and
    strict parsers refuse the bare NaN Python's json writes by default."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite_only(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [finite_only(v) for v in doc]
    return doc


def write_json_atomic(path: Path | str, doc: object, indent: int = 1) -> Path:
    """Write ``doc`` as JSON so that ``path`` holds the old or the new content, never half
    of it (a ``.partial`` file renamed over it)."""
    import os

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc, indent=indent))
    os.replace(partial, path)
    return path
