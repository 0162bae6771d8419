"""Small result files, written atomically (temporary file, then rename) so a crash never leaves half of one; and
the content hashes of large input files."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path


def nonfinite(obj, at: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number in a JSON-like object, with its dotted key, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return at, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        if found := nonfinite(v, f"{at}.{k}" if at else str(k)):
            return found
    return None


def write_json(obj, path: Path) -> None:
    """`obj` as JSON, atomically; a non-finite number (which is not JSON, and no metric) is an error naming its key,
    and the file keeps what it held."""
    path = Path(path)
    if found := nonfinite(obj):
        raise ValueError(f"{path}: {found[0]} is {found[1]}, not a finite number: not written")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)


def write_csv(rows: list[dict], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def sha256(path: Path) -> str:
    """The sha256 of a file's content. A link into the Hugging Face hub cache gives it without reading: the cache
    names a large (LFS) file's blob by its sha256 (a 64-digit name; git files' blobs have 40)."""
    path = Path(path)
    if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", path.resolve().name):
        return path.resolve().name
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
