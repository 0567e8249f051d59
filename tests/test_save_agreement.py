"""A checkpoint save that fails on one rank of two (parallel/state/save_errors.py: ``agree_on_failure``).

Two real train.py ranks (data parallel, gloo), forked from the tests' preloaded server by ``spawn_each``, but
each with its own exit code and log, and each left to exit by itself: ``spawn_ranks`` (as DeepSpeed's launcher)
ends the other ranks as soon as one fails, which would hide whether they stop on their own. Rank 1's disk is full
while it writes the step-2 checkpoint (tests/test_hostile_run.py's patch, applied in rank 1 only): both ranks
must stop with exit code 3 and one line, and the step-2 checkpoint must never count as complete. ~15 s.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from parallel.state import checkpoint
from tests.test_hostile_run import _disk_full_at
from tests.train_helpers import make_corpus, run_args, spawn_each


def _disk_full_step2() -> None:
    _disk_full_at("step_0000002", shards_only=False)


def _error_line(p: subprocess.CompletedProcess, rank: int) -> str:
    assert "Traceback" not in p.stderr, f"rank {rank}:\n{p.stderr[-3000:]}"
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    return line


@pytest.mark.slow
def test_a_full_disk_on_one_rank_stops_both_with_one_line(tmp_path):
    """Rank 1's write of its own file of the step-2 checkpoint (its RNG state) fails with ENOSPC; rank 0's
    writes succeed. agree_on_failure: rank 1 names its error, rank 0 says another rank failed; both exit 3,
    neither hangs in a later collective; step 1 stays the newest complete checkpoint."""
    corpus = make_corpus(tmp_path)
    args = run_args(tmp_path, corpus, "run", ["train.max_steps=3", "train.save_every=1", "train.eval_every=100",
                                              "train.eval_batches=0"])
    rank0, rank1 = spawn_each(2, args, patches={1: _disk_full_step2})
    step1 = checkpoint.checkpoint_root(str(tmp_path / "run")) / "step_0000001"
    step2 = step1.parent / "step_0000002"
    assert (rank0.returncode, rank1.returncode) == (3, 3), rank0.stderr[-2000:] + rank1.stderr[-2000:]
    own, other = _error_line(rank1, 1), _error_line(rank0, 0)
    assert own.startswith(f"error: checkpoint {step2} could not be written (") and \
        "No space left on device" in own and f"the newest complete checkpoint, {step1}, is intact" in own, own
    assert other.startswith(f"error: checkpoint {step2} could not be written on another rank"), other
    assert checkpoint.complete_checkpoints(str(tmp_path / "run")) == [step1]
    assert not (Path(step2) / checkpoint.MARKER).exists()
