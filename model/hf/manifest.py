"""Checkpoint integrity: a SHA-256 manifest written before the COMPLETE marker and checked before
anything in the directory is loaded.

``MANIFEST.json`` lists every file of the checkpoint (relative path, size, sha256) except
itself and the marker. ``verify`` reports the first missing, truncated or altered file by
name, so a checkpoint damaged on disk or in transfer is never half-loaded. Plain file I/O: a
single-process export verifies with it, and the training checkpoints (parallel/state) write it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from model.hf.safe_paths import inside

MANIFEST = "MANIFEST.json"
_SKIP = {MANIFEST, "COMPLETE"}


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in _SKIP)


def write_manifest(root: Path) -> None:
    """Hash every file under ``root`` into root/MANIFEST.json (atomically)."""
    entries = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
               for p in _files(root)}
    tmp = root / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def verify(root: Path) -> None:
    """Raise ValueError naming the first file of ``root`` that does not match its manifest."""
    root = Path(root)
    mf = root / MANIFEST
    if not mf.is_file():
        raise ValueError(f"checkpoint {root}: {MANIFEST} is missing; cannot verify its files "
                         "(saved by an older version, or damaged)")
    try:
        entries = json.loads(mf.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {root}: {mf} is unreadable: {e}") from e
    if not isinstance(entries, dict):
        raise ValueError(f"checkpoint {root}: {mf}: 'files' is not a JSON object")
    for rel, want in sorted(entries.items()):
        p = inside(root, rel, str(mf))          # relative, no '..', no symlink out of the checkpoint
        if not p.is_file():
            raise ValueError(f"checkpoint {root}: file {p} listed in {MANIFEST} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise ValueError(f"checkpoint {root}: file {p} is {size} bytes, the manifest says {want['size']} "
                             "(truncated or overwritten)")
        if sha256(p) != want["sha256"]:
            raise ValueError(f"checkpoint {root}: file {p} fails its SHA-256 check (corrupted or modified)")
    extra = [p for p in _files(root) if p.relative_to(root).as_posix() not in entries]
    if extra:
        raise ValueError(f"checkpoint {root}: file {extra[0]} is not in {MANIFEST} (added after the save)")
