"""Which run owns a checkpoint: every run has an id (32 hex digits, written as ``run_id`` in each
checkpoint's trainer_state.json); a resume adopts the id of the checkpoint it continues. Pruning
deletes only the current run's checkpoints, and a save never replaces a complete checkpoint of
another run (parallel/state/checkpoint.py uses these)."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.hf.weight_reader import NAME, STATE, is_complete

RUN_ID = "run_id"                      # trainer_state.json: the run that wrote the checkpoint
_RUN_ID_FORMAT = re.compile(r"^[0-9a-f]{32}$")
NO_STATE = "<no trainer_state.json>"   # run_id_of a directory without one (a save that died early)
UNREADABLE = "<unreadable trainer_state.json>"


def new_run_id() -> str:
    return uuid.uuid4().hex


def saved_run_id(state: dict[str, Any], path: Path | None = None) -> str | None:
    """The run id in a checkpoint's trainer_state (None: written before run ids); ValueError if malformed."""
    value = state.get(RUN_ID)
    if value is not None and not (isinstance(value, str) and _RUN_ID_FORMAT.match(value)):
        raise ValueError(f"checkpoint {path or '(resumed)'}: {RUN_ID}={value!r} in {STATE} is not a run id "
                         "(32 hex digits)")
    return value


def run_id_for(state: dict[str, Any], path: Path | None = None) -> str:
    """The id of this run: the resumed checkpoint's (``state`` is its trainer_state), else a new one
    (a fresh run, or a checkpoint written before run ids)."""
    return (saved_run_id(state, path) if state else None) or new_run_id()


def run_id_of(path: Path) -> str | None:
    """The run that wrote checkpoint directory ``path``: its id, None (before run ids), NO_STATE or UNREADABLE."""
    f = Path(path) / STATE
    if not f.is_file():
        return NO_STATE
    try:
        value = json.loads(f.read_text(encoding="utf-8")).get(RUN_ID)
    except (OSError, ValueError, AttributeError):
        return UNREADABLE
    return value if value is None or isinstance(value, str) else UNREADABLE


def step_of(path: Path, state: dict[str, Any] | None = None) -> int:
    m = NAME.match(path.name)
    return int(m.group(1)) if m else int((state or {}).get("step", 0))


def agree_on_run_id(run_id: str | None, group: Any) -> str | None:
    """Rank 0's run id on every rank (a fresh run draws one per rank; rank 0 writes trainer_state.json)."""
    if run_id is None:
        return None
    t = torch.tensor(list(bytes.fromhex(run_id)), dtype=torch.uint8)
    dist.broadcast(t, src=0, group=group)
    return bytes(t.tolist()).hex()


def refuse_foreign(path: Path, run_id: str | None) -> None:
    """Every rank, before a save replaces ``path``: never a complete checkpoint of another run."""
    if is_complete(path) and (owner := run_id_of(path)) != run_id:
        raise ValueError(f"{path} is a complete checkpoint of another run (run id {owner}; this run is {run_id}): "
                         "not overwritten; choose another train.out_dir")


def check_out_dir_path(out_dir: str) -> None:
    """train.out_dir must be a directory or creatable as one: a file there (or on the way) is named."""
    p = Path(out_dir).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"train.out_dir={out_dir!r}: {q} is a file, not a directory")
            return
