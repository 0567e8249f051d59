"""Hostile and careless inputs to a training run (issue 31, items 8, 10 and the gaps of item 1/7):
SIGTERM before the first step, a full disk during a save (sync and async), ``train.out_dir`` that is a
file, ``train.overwrite=true`` over a lone metrics.jsonl, DeepSpeed's mesh keys. Real short train.py
runs, forked from the tests' preloaded server; a fault is injected by patching one function in the
child before train.py runs (a build that takes minutes, a write that finds the disk full).
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from configs.schema import load_config
from parallel.state import checkpoint
from tests.train_helpers import (
    _context,
    _run_train_py,
    _TimedOut,
    _wait,
    clean_env,
    make_corpus,
    metrics,
    run_args,
    train,
)


def _sigterm_then_hang(module: str, name: str) -> None:
    """``module.name`` sends this process SIGTERM, then takes a minute (a large model's build or load)."""
    import importlib

    mod = importlib.import_module(module)
    real = getattr(mod, name)

    def slow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        return real(*args, **kwargs)
    setattr(mod, name, slow)


def _disk_full_at(step_dir: str, shards_only: bool) -> None:
    """Every safetensors write into ``step_dir`` (only the DCP shard files with ``shards_only``) fails as a
    full disk does."""
    from model.hf import safetensors_stream

    real = safetensors_stream.SafetensorsWriter.write

    def write(self, name, tensor, row=0):  # noqa: ANN001, ANN202
        if step_dir in str(self.path) and (not shards_only or self.path.name.startswith(".shard-")
                                           or self.path.name.startswith("shard-")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._tmp))
        return real(self, name, tensor, row)
    safetensors_stream.SafetensorsWriter.write = write


def _sigterm_while_saving(step_dir: str) -> None:
    """The first safetensors write into ``step_dir`` sends this process SIGTERM (a pre-emption mid-save)."""
    from model.hf import safetensors_stream

    real = safetensors_stream.SafetensorsWriter.write
    sent = []

    def write(self, name, tensor, row=0):  # noqa: ANN001, ANN202
        if step_dir in str(self.path) and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, name, tensor, row)
    safetensors_stream.SafetensorsWriter.write = write


PATCHES = {
    "sigterm_in_save_step2": lambda: _sigterm_while_saving("step_0000002"),
    "sigterm_in_build": lambda: _sigterm_then_hang("parallel.build", "build_training"),
    "sigterm_in_resume_load": lambda: _sigterm_then_hang("parallel.state.checkpoint", "load"),
    "disk_full_step2": lambda: _disk_full_at("step_0000002", shards_only=False),
    "disk_full_step4_shards": lambda: _disk_full_at("step_0000004", shards_only=True),
}


def _patched(patch: str, argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    PATCHES[patch]()
    _run_train_py(argv, env, out, err)


def train_patched(patch: str, args: list[str], timeout: int = 120) -> tuple[subprocess.CompletedProcess, float]:
    """train.py ARGS with PATCHES[patch] applied in the child; -> (result, seconds from start to exit)."""
    with tempfile.TemporaryDirectory() as logs:
        out, err = f"{logs}/train.out", f"{logs}/train.err"
        proc = _context().Process(target=_patched, args=(patch, list(args), clean_env(), out, err))
        t0 = time.monotonic()
        proc.start()
        try:
            code = _wait([proc], timeout)
        except _TimedOut:
            raise subprocess.TimeoutExpired(["train.py", *args], timeout) from None
        seconds = time.monotonic() - t0
        return subprocess.CompletedProcess(args, code, open(out).read(), open(err).read()), seconds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _args(tmp: Path, corpus: Path, *extra: str) -> list[str]:
    return run_args(tmp, corpus, extra=["train.eval_every=100", "train.eval_batches=0", *extra])


def _error_lines(p: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return [line for line in p.stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- 8. SIGTERM before the first step

def test_sigterm_during_the_build_stops_at_once(tmp_path, corpus):
    p, seconds = train_patched("sigterm_in_build", _args(tmp_path, corpus, "train.max_steps=3"), timeout=50)
    print(f"SIGTERM during the build: exit {p.returncode} after {seconds:.1f} s (the build would take 60 s)")
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    assert "rank 0: SIGTERM before the first step: stopped (nothing trained yet, so nothing to save" in p.stderr
    assert "Traceback" not in p.stderr
    assert checkpoint.complete_checkpoints(str(tmp_path / "run")) == []


def test_sigterm_while_loading_the_resumed_checkpoint_stops_at_once(tmp_path, corpus):
    train(_args(tmp_path, corpus, "train.max_steps=1"))
    (ckpt,) = checkpoint.complete_checkpoints(str(tmp_path / "run"))
    before = {f: f.read_bytes() for f in ckpt.rglob("*") if f.is_file()}
    p, seconds = train_patched("sigterm_in_resume_load", _args(tmp_path, corpus, "train.max_steps=3",
                                                               "train.resume=auto"), timeout=50)
    print(f"SIGTERM while loading the checkpoint: exit {p.returncode} after {seconds:.1f} s")
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    assert "SIGTERM before the first step: stopped" in p.stderr and "Traceback" not in p.stderr
    assert checkpoint.complete_checkpoints(str(tmp_path / "run")) == [ckpt]
    assert {f: f.read_bytes() for f in ckpt.rglob("*") if f.is_file()} == before


def test_sigterm_during_a_save_stops_after_that_save(tmp_path, corpus):
    """The checkpoint being written holds the step's state: the run stops once it is complete, without
    another step and another save (before: one more step, a second save)."""
    p, _ = train_patched("sigterm_in_save_step2", _args(tmp_path, corpus, "train.max_steps=6", "train.save_every=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stopped by SIGTERM at step 2; resume with train.resume=auto" in p.stdout
    assert [m["step"] for m in metrics(tmp_path / "run")][-1] == 2
    assert [c.name for c in checkpoint.complete_checkpoints(str(tmp_path / "run"))] == ["step_0000002"]


# ---------------------------------------------------------------- 10. a full disk during a save

def test_a_full_disk_during_a_synchronous_save_is_one_line(tmp_path, corpus):
    p, _ = train_patched("disk_full_step2", _args(tmp_path, corpus, "train.max_steps=3", "train.save_every=1"))
    step1 = checkpoint.checkpoint_root(str(tmp_path / "run")) / "step_0000001"
    assert p.returncode == 3, p.stderr[-3000:]
    (error,) = _error_lines(p)
    assert error.startswith(f"error: checkpoint {step1.parent / 'step_0000002'} could not be written (") \
        and "No space left on device" in error and f"the newest complete checkpoint, {step1}, is intact" in error, error
    assert checkpoint.complete_checkpoints(str(tmp_path / "run")) == [step1]


def test_a_failed_async_save_stops_the_run_before_the_next_save(tmp_path, corpus):
    """The background write fails; the run stops at the first step after every rank knows it, by the
    per-step check, not at the next save's wait. How many steps the writer takes to fail depends on the
    machine's load (one step here when quiet, two under CI), so the test leaves it three steps of room."""
    p, _ = train_patched("disk_full_step4_shards", _args(tmp_path, corpus, "train.max_steps=8", "train.save_every=4",
                                                         "train.async_save=true"))
    assert p.returncode == 3, p.stderr[-3000:]
    (error,) = _error_lines(p)
    assert "step_0000004 could not be written (" in error and "No space left on device" in error, error
    last = [m["step"] for m in metrics(tmp_path / "run")][-1]
    assert 5 <= last <= 7, last          # step 8 would be the next save's wait (or the end of the run)
    assert checkpoint.complete_checkpoints(str(tmp_path / "run")) == []


# ---------------------------------------------------------------- out_dir, overwrite, DeepSpeed's mesh keys

@pytest.mark.parametrize("where", ["itself", "a parent"])
def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, corpus, where):
    f = tmp_path / "run"
    f.write_text("not a directory")
    out = f if where == "itself" else f / "sub"
    p = train(_args(tmp_path, corpus, "train.max_steps=1", f"train.out_dir={out}"), check=False)
    assert p.returncode == 2
    assert _error_lines(p) == [f"error: train.out_dir='{out}': {f} is a file, not a directory"]


def test_overwrite_starts_a_lone_old_metrics_log_afresh(tmp_path, corpus):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    p = train(_args(tmp_path, corpus, "train.max_steps=1", "train.overwrite=true"))
    assert "removed 0 checkpoint(s) of another run" in p.stdout and "and its metrics.jsonl" in p.stdout
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1]


def test_deepspeeds_mesh_keys_are_accepted():
    """deepspeed.initialize reads data_parallel_size / sequence_parallel_size itself (not through its config
    parser): the keys come from its source too."""
    cfg = load_config(None, ["deepspeed.data_parallel_size=1", "deepspeed.sequence_parallel_size=1"])
    assert cfg.deepspeed["sequence_parallel_size"] == 1
    with pytest.raises(ValueError, match=r"^deepspeed\.sequence_parallel_sizes: not a key"):
        load_config(None, ["deepspeed.sequence_parallel_sizes=1"])
