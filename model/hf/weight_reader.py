"""Weights on disk read tensor by tensor, in this project's naming (the full model, experts stacked
over all E): a training checkpoint's sharded state (its fp32 masters, through model/hf/flat_shards.py)
or a directory written by scripts/import_hf.py (model.safetensors). What scripts/export_hf.py
streams from and ``train.init_from`` reads its slices from; no process group, never the whole model.

The file names of a checkpoint directory live here too (parallel/state/checkpoint.py writes them).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from model.hf import flat_shards
from model.hf.manifest import MANIFEST, verify
from model.hf.safe_header import read_header
from model.hf.safe_paths import inside

MARKER = "COMPLETE"
STATE = "trainer_state.json"
MODEL = "model.safetensors"          # the weights of a scripts/import_hf.py directory
SHARDS = "state"                     # the sharded state directory of a training checkpoint
FORMAT = "moe-trainer-sharded-1"
INIT_CONFIG = "model_config.json"   # written by scripts/import_hf.py: {"model": {...}}
BIAS_SUFFIX = "e_score_correction_bias"
TOKENIZER = "tokenizer"                # a copy of the run's tokenizer
NAME = re.compile(r"^step_(\d+)$")    # OUT_DIR/checkpoints/step_0000100


def checkpoint_root(out_dir: str) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(out_dir: str) -> list[Path]:
    """Complete checkpoints under out_dir, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()



def state_key(kind: str, name: str, prefix: str = "") -> str:
    """The key of one tensor in the sharded state: ``param/<name>``, ``exp_avg/<name>``, ``buffer/<name>``."""
    return f"{prefix}{kind}/{name}"


def read_state(path: Path) -> dict[str, Any]:
    f = path / STATE
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: cannot read {STATE}: {e}") from e


def check_format(path: Path, state: dict[str, Any]) -> None:
    if state.get("format") == FORMAT and (path / SHARDS).is_dir():
        return
    if (path / "optimizer.safetensors").is_file() or (path / MODEL).is_file():
        raise ValueError(f"checkpoint {path} is in the pre-sharded format (DeepSpeed engine files + gathered "
                         f"model.safetensors/optimizer.safetensors, before {FORMAT}): this version cannot resume "
                         "it; export it with an older checkout's scripts/export_hf.py and continue with "
                         "scripts/import_hf.py + train.init_from")
    raise ValueError(f"checkpoint {path}: format {state.get('format')!r} with no {SHARDS}/ directory: not a "
                     f"checkpoint this version wrote (expected format {FORMAT!r})")


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model`` config section stored with a weight directory: model_config.json (from
    scripts/import_hf.py) or trainer_state.json (a training checkpoint)."""
    p = Path(path)
    for name, get in ((INIT_CONFIG, lambda d: d.get("model")),
                      (STATE, lambda d: d.get("config", {}).get("model"))):
        f = p / name
        if f.is_file():
            try:
                model = get(json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise ValueError(f"{f}: cannot read: {e}") from e
            if not isinstance(model, dict):
                raise ValueError(f"{f} has no model config section")
            return model
    raise FileNotFoundError(f"{p}: neither {INIT_CONFIG} nor {STATE} found (not a directory written by "
                            "scripts/import_hf.py or a training checkpoint)")


class WeightReader:
    """A weight directory's tensors one at a time, in this project's naming (the full model, experts
    stacked over all E): what scripts/export_hf.py streams from and train.init_from reads its slices
    from. Never loads the whole model.

    ``names()`` lists the tensors, ``shape(name)`` / ``dtype(name)`` describe one without reading it,
    ``read(name, start, stop)`` returns rows [start, stop) of its first dimension (all by default;
    for experts, a range of expert ids), ``config`` is the model config section.

    Sharded checkpoints: the weights are the fp32 masters, returned in the run's training dtype
    (``train.dtype``: a bf16 run's module weights are exactly bf16(master)); the router biases fp32.
    Directories from scripts/import_hf.py: their model.safetensors as stored."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_model_config(self.path)
        if (self.path / SHARDS).is_dir():
            state = read_state(self.path)
            check_format(self.path, state)
            # the index against every shard's header: no gap, no overlap, no file outside state/
            self._index = flat_shards.check_shards(self.path / SHARDS)
            train_dtype = state.get("config", {}).get("train", {}).get("dtype", "fp32")
            weight_dtype = torch.bfloat16 if train_dtype == "bf16" else torch.float32
            self._meta = {}
            tensors = state.get("tensors")
            if not isinstance(tensors, dict):
                raise ValueError(f"checkpoint {self.path}: {STATE} has no 'tensors' mapping of names to shapes")
            for name, shape in tensors.items():
                bias = name.endswith(BIAS_SUFFIX)
                fqn = state_key("buffer" if bias else "param", name)
                if fqn not in self._index:
                    raise ValueError(f"checkpoint {self.path}: {name} is missing from {SHARDS}/{flat_shards.INDEX}")
                self._meta[name] = (self._checked_shape(name, shape, fqn), torch.float32 if bias else weight_dtype, fqn)
            return
        self._file = self.path / MODEL
        if not self._file.is_file():
            raise FileNotFoundError(f"{self._file} not found: this directory has no model weights")
        inside(self.path, MODEL, str(self.path), plain=True)
        self._meta = {k: (t.shape, t.dtype, None) for k, t in read_header(self._file).tensors.items()}
        self._index = None

    def _checked_shape(self, name: str, shape: object, fqn: str) -> tuple[int, ...]:
        """trainer_state.json's shape of ``name``, which must hold exactly the index's element count."""
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise ValueError(f"checkpoint {self.path}: {STATE}: tensors.{name}={shape!r} is not a shape")
        numel, stored = math.prod(shape), self._index[fqn]["size"][0]
        if numel != stored:
            raise ValueError(f"checkpoint {self.path}: {STATE}: tensors.{name} has shape {shape} ({numel} elements), "
                             f"{SHARDS}/{flat_shards.INDEX} and the shard headers hold {stored}")
        return tuple(shape)

    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        shape, dtype, fqn = self._meta[name]
        rows = shape[0] if shape else 1
        start, stop = start or 0, rows if stop is None else stop
        if self._index is None:
            with safe_open(str(self._file), framework="pt") as f:
                return f.get_tensor(name) if (start, stop) == (0, rows) else f.get_slice(name)[start:stop]
        per_row = math.prod(shape[1:]) if shape else 1
        flat = flat_shards.read_flat(self.path / SHARDS, self._index, fqn, start * per_row, stop * per_row)
        return flat.view(stop - start, *shape[1:]).to(dtype) if shape else flat.view(()).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor at once (small models, tests)."""
        return {n: self.read(n) for n in self.names()}


def open_weights(path: str | os.PathLike) -> WeightReader:
    """A WeightReader for a complete checkpoint or an import_hf.py directory (checked against its
    manifest first)."""
    p = Path(path)
    if (p / STATE).is_file() or (p / MANIFEST).is_file():
        verify(p)
    return WeightReader(p)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint (experts gathered; tests and small models)."""
    return open_weights(path).state_dict()


def read_biases(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The router biases of a checkpoint, by MoE layer: {"layer0": (E,), ...} in model order."""
    sd = open_weights(path)
    return {f"layer{i}": sd.read(n) for i, n in enumerate(n for n in sd.names() if n.endswith(BIAS_SUFFIX))}
