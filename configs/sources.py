"""``data.sources`` and ``data.val_sources``: lists of corpora, validated before anything is read.

Each entry is a mapping ``{path, weight, text_field, name, max_files}``:

    path        the corpus (as data.path: a file, a folder, a save_to_disk directory; null: the default corpus)
    weight      its share of the training rows (normalised over the list); a finite number > 0, default 1
    text_field  the column holding the text (default "text")
    name        the key of its metrics (tokens_by_source, val_loss_by_source); default: the path's file or
                folder name without its suffix
    max_files   cap on the files read from a folder (default: all)

``normalize_sources`` returns the list with every key filled in, or raises a ValueError naming the
entry (its index and name) and the value. Nothing here reads the corpora (data/sources.py does).
"""
from __future__ import annotations

import math
import re
from pathlib import PurePath
from typing import Any

SOURCE_KEYS = ("path", "weight", "text_field", "name", "max_files")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def default_name(path: str | None) -> str:
    """'web' for data/web.jsonl, 'corpus' for a folder data/corpus/, 'stdlib' for the default corpus."""
    if path is None:
        return "stdlib"
    stem = PurePath(path.rstrip("/\\")).stem or PurePath(path).name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("_.-") or "source"


def _weight(where: str, value: Any) -> float:
    if isinstance(value, str):
        try:   # YAML 1.1 reads "7e-1" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: weight={value!r}: must be a finite number > 0")
    return float(value)


def _entry(key: str, i: int, src: Any) -> dict[str, Any]:
    """One entry, checked and completed."""
    if not isinstance(src, dict):
        raise ValueError(f"{key}[{i}]={src!r}: expected a mapping {{path, weight, text_field}}")
    unknown = sorted(set(src) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"{key}[{i}]: unknown key(s) {unknown}; known keys: {list(SOURCE_KEYS)}")
    if "path" not in src:
        raise ValueError(f"{key}[{i}]: path is required (null for the default corpus)")
    path = src["path"]
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ValueError(f"{key}[{i}]: path={path!r}: expected a corpus path (or null for the default corpus)")
    name = src.get("name")
    name = default_name(path) if name is None else name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{key}[{i}]: name={name!r}: use letters, digits, '_', '.' or '-' (it keys the metrics)")
    where = f"{key}[{i}] ({name!r})"
    text_field = src.get("text_field", "text")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"{where}: text_field={text_field!r}: expected a column name")
    max_files = src.get("max_files")
    if max_files is not None and (isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 1):
        raise ValueError(f"{where}: max_files={max_files!r}: must be an integer >= 1 or null")
    return {"name": name, "path": path, "weight": _weight(where, src.get("weight", 1.0)),
            "text_field": text_field, "max_files": max_files}


def normalize_sources(value: Any, key: str) -> list[dict[str, Any]] | None:
    """``value`` as read from the config (null, or a list of mappings) -> the completed list, or None."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key}={value!r}: expected a non-empty list of {{path, weight, text_field}} mappings "
                         "(or null)")
    out = [_entry(key, i, src) for i, src in enumerate(value)]
    seen: dict[str, int] = {}
    for i, src in enumerate(out):
        if src["name"] in seen:
            raise ValueError(f"{key}[{seen[src['name']]}] and {key}[{i}] are both named {src['name']!r}; "
                             "give each a distinct name")
        seen[src["name"]] = i
    return out
