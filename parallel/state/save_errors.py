"""A checkpoint save that cannot write (a full disk, a quota, a read-only mount) ends the run with one
line on every rank, never a traceback or a rank left waiting in a collective.

Every rank-local write of a save is followed by ``agree_on_failure`` over the checkpoint group (it
replaces the barrier that was there): if any rank failed, every rank raises ``SaveFailed`` together.
DCP's own writes already propagate one rank's failure to all (``CheckpointException``), which
``from_dcp`` turns into the same line. The directory being written has no COMPLETE marker, so no
resume ever reads it; the newest complete checkpoint is untouched and named in the message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; the run stops (train.py: one line, exit 3)."""


def _cause(e: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException (else ``e``)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        inner = failures[rank]
        return inner[0] if isinstance(inner, tuple) else inner
    return e


def describe(path: Path, e: BaseException) -> str:
    from model.hf.weight_reader import complete_checkpoints

    cause = _cause(e)
    what = (f"{getattr(cause, 'filename', None) or path}: {cause.strerror}" if isinstance(cause, OSError)
            and cause.strerror else f"{type(cause).__name__}: {cause}")
    newest = [p for p in complete_checkpoints(str(path.parent.parent)) if p != path]
    kept = f"the newest complete checkpoint, {newest[-1]}, is intact" if newest else "no earlier checkpoint exists"
    return (f"checkpoint {path} could not be written ({what}); it is incomplete and will never be resumed; "
            f"{kept}: free space (or fix the path) and resume with train.resume=auto")


def from_dcp(path: Path, e: BaseException) -> SaveFailed:
    return SaveFailed(describe(path, e))


def agree_on_failure(error: BaseException | None, path: Path, group: Any) -> None:
    """Collective over ``group``: raise SaveFailed on every rank when ``error`` is set on any (this rank's
    own message where it failed, the other's path where it did not). Also the barrier of the step."""
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise SaveFailed(describe(path, error)) from None
    if failed.item():
        raise SaveFailed(f"checkpoint {path} could not be written on another rank (its error is in its log); "
                         "the run stops; resume with train.resume=auto once it is fixed")
