"""Checkpoint integrity: a SHA-256 manifest written before the COMPLETE marker, checked
before anything in the directory is loaded, and a DeepSpeed checkpoint engine that
refuses pickled code.

``MANIFEST.json`` lists every file of the checkpoint (relative path, size, sha256) except
itself and the marker. ``verify`` reports the first missing, truncated or altered file by
name, so a checkpoint damaged on disk or in transfer is never half-loaded.

DeepSpeed writes its engine and optimizer state with ``torch.save``; its stock loader reads
them back with ``weights_only=False``, which would run any code a tampered file carries.
``SafeTorchCheckpointEngine`` loads with ``weights_only=True`` and allows only the few
DeepSpeed classes those files legitimately contain.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

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
    for rel, want in sorted(entries.items()):
        p = root / rel
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


def _allowed_globals() -> list:
    """The non-tensor classes DeepSpeed's own checkpoint files hold (ZeRO-1/2 included)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safe_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # UnpicklingError for a disallowed global, or a damaged file
            raise ValueError(f"checkpoint file {path} refused: it is not a plain weights file "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


def safe_checkpoint_engine(engine) -> None:
    """Make ``engine`` read its checkpoint files with ``weights_only=True`` (call after initialize;
    DeepSpeed creates its checkpoint engine once, in initialize)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"deepspeed checkpoint engine {type(current).__name__} is not supported: only the "
                         "default torch engine is known to be made safe against pickled code")
    current.load = _safe_load   # the instance's load shadows the class method that unpickles anything
    # DeepSpeed also copies its zero_to_fp32.py / zero_to_torch.py beside every save; they read
    # checkpoints with weights_only=False. Ours carry model.safetensors and optimizer.safetensors
    # instead, so those scripts are not shipped.
    engine._copy_recovery_script = lambda save_path: None
