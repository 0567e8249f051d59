"""``train.init_from``: a fresh run starts from the weights of a directory written by
scripts/import_hf.py or of a training checkpoint, each rank reading only the tensors (and expert
rows) it holds. Only weights: optimizer, step, sampler and RNG start fresh.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from model.hf.weight_reader import MARKER, MODEL, SHARDS, STATE, is_complete, open_weights, read_model_config
from parallel.state import ownership
from parallel.state.checkpoint import TRAINING_ONLY, first_difference

# Model fields a weight file may differ in from the run it initialises: they change neither the
# parameters' shapes nor what they compute (token ids, the context length the RoPE tables cover).
INIT_FREE = TRAINING_ONLY | {"bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"}


def check_init_compatible(saved: dict[str, Any], model_cfg: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise a ValueError naming the first model field in which the weights and the run differ."""
    diff = first_difference(saved, model_cfg, INIT_FREE)
    if diff:
        raise ValueError(f"train.init_from={str(path)!r} does not fit the model: its weights have {diff}")


def load_init_weights(model: torch.nn.Module, path: str | os.PathLike, stage_only: bool = False) -> None:
    """Load the weights of ``path`` (a directory from scripts/import_hf.py, or a training checkpoint)
    into a freshly built model, which may hold only its EP rank's experts (any ep works): each rank
    reads only what it holds, one tensor at a time (its experts' rows of the stacked tensors).

    Checks the stored model config against ``model.config`` first (ValueError naming the field).
    Call it on every rank after the model is built and sharded, before deepspeed.initialize.
    Only weights are loaded: optimizer, step, sampler and RNG start fresh. ``stage_only``: the model holds its
    pipeline stages' modules only (parallel.pp), so the other stages' tensors in ``path`` are not its own."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"train.init_from={str(path)!r}: directory does not exist")
    if (p / STATE).is_file() and not is_complete(p):
        raise ValueError(f"train.init_from={str(path)!r}: incomplete checkpoint (no {MARKER} marker)")
    if not (p / MODEL).is_file() and not (p / SHARDS).is_dir():
        raise FileNotFoundError(f"train.init_from={str(path)!r}: {p / MODEL} not found (make one with "
                                "scripts/import_hf.py, or use a checkpoint saved by this version)")
    check_init_compatible(read_model_config(p), model.config.to_dict(), p)
    weights = open_weights(p)
    layouts = ownership.expert_layouts(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights.names()))
    unexpected = [] if stage_only else sorted(set(weights.names()) - set(own))   # the config was compared above
    if missing or unexpected:
        raise ValueError(f"train.init_from={str(path)!r}: weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, dest in own.items():
            lay = layouts.get(name)
            if lay is None:
                parts = [weights.read(name)]
            else:                                          # this rank's experts, one run of ids at a time
                parts = [weights.read(name, e, e + n) for _, e, n in ownership.expert_runs(lay.expert_ids)]
            value = torch.cat(parts) if len(parts) > 1 else parts[0]
            if tuple(value.shape) != tuple(dest.shape):
                raise ValueError(f"train.init_from={str(path)!r}: {name} has shape {tuple(value.shape)}, the model "
                                 f"holds {tuple(dest.shape)}")
            dest.copy_(value.to(dest.dtype))
