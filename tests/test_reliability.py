"""Faults under the real launcher: ranks that die, hang, see NaNs or get SIGTERM; checkpoints
that are half-written, corrupted or carry a pickle payload. Faults are injected with
MOE_FAULTS (parallel/faults.py); every run is a real `deepspeed --num_gpus 2 train.py` (or
`python train.py`) on CPU with gloo."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from model.hf import manifest, weight_reader
from parallel.state import checkpoint
from tests.helpers import PicklePayload, free_port
from tests.train_helpers import ROOT, clean_env, make_corpus, metrics, run_args, spawn_ranks, train

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _need_launcher():
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")


def _start(n: int, args: list[str], log: Path, faults: str = "") -> subprocess.Popen:
    """The launcher in its own session, as a scheduler starts a job (so killpg reaches all of it)."""
    cmd = ["deepspeed", "--num_gpus", str(n), "--master_port", str(free_port()), str(ROOT / "train.py"), *args]
    env = {**clean_env(), "MOE_FAULTS": faults}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run(n: int, args: list[str], log: Path, faults: str = "", timeout: int = 300) -> tuple[int, str, float]:
    """-> (exit status, output, time the launcher exited)."""
    p = _start(n, args, log, faults)
    try:
        rc = p.wait(timeout=timeout)
    finally:
        _kill_leftovers(p)
    return rc, log.read_text(errors="replace"), time.time()


def _kill_leftovers(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _job_processes(marker: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or []):
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _assert_no_orphans(marker: str, grace: float = 5.0) -> None:
    deadline = time.time() + grace
    while (left := _job_processes(marker)) and time.time() < deadline:
        time.sleep(0.2)
    left = _job_processes(marker)
    for proc in left:
        proc.kill()
    assert not left, f"processes left behind: {[p.pid for p in left]}"


def _fault_time(out: str, what: str) -> float:
    m = re.search(rf"\[faults\] rank \d+: {what}.*? t=([0-9.]+)", out)   # lazy: other ranks may share the line
    assert m, f"no '{what}' fault line in the output:\n{out[-3000:]}"
    return float(m.group(1))


def _steps(out_dir: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in checkpoint.complete_checkpoints(str(out_dir))]


# ------------------------------------------------------------------------------------------ rank death


def test_rank_killed_while_saving(tmp_path):
    """Rank 1 is SIGKILLed inside the step-4 save: the job fails within 60 s, leaves no process,
    step 2 stays the checkpoint resume=auto picks, a corrupted copy of it is named by both ranks,
    and resuming re-saves step 4."""
    corpus = make_corpus(tmp_path)
    out = tmp_path / "run"
    args = run_args(tmp_path, corpus, "run", ["train.max_steps=6", "train.save_every=2", "train.micro_batch_size=2"])
    rc, log, ended = _run(2, args, tmp_path / "crash.log", faults="kill_in_save@4/1")
    assert rc != 0
    assert ended - _fault_time(log, "killed while saving step 4") < 60
    _assert_no_orphans(str(out))
    assert _steps(out) == [2]
    assert (out / "checkpoints" / "step_0000004").is_dir() and not checkpoint.is_complete(
        out / "checkpoints" / "step_0000004")
    assert checkpoint.resolve_resume("auto", str(out)).name == "step_0000002"

    # a bit flipped in the checkpoint to resume from: every rank names the file, nothing trains
    weights = out / "checkpoints" / "step_0000002" / checkpoint.SHARDS / "shard-00001.safetensors"
    good = weights.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    weights.write_bytes(bytes(bad))
    rc, log, _ = _run(2, args + ["train.resume=auto"], tmp_path / "corrupt.log")
    assert rc != 0
    assert len(re.findall(rf"error: checkpoint \S+step_0000002: file {re.escape(str(weights))} fails its "
                          r"SHA-256 check", log)) == 2, log[-3000:]
    _assert_no_orphans(str(out))
    weights.write_bytes(good)

    rc, log, _ = _run(2, args + ["train.resume=auto"], tmp_path / "resume.log")
    assert rc == 0, log[-4000:]
    assert _steps(out)[-2:] == [4, 6]
    for step in (4, 6):
        manifest.verify(out / "checkpoints" / checkpoint.checkpoint_name(step))
    assert metrics(out)[-1]["step"] == 6


def test_rank_exit_fails_the_job(tmp_path):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "run"
    args = run_args(tmp_path, corpus, "run", ["train.max_steps=20", "train.save_every=100",
                                              "train.micro_batch_size=2", "parallel.ep=2"])
    rc, log, ended = _run(2, args, tmp_path / "exit.log", faults="exit=7@3/1")
    assert rc != 0
    assert ended - _fault_time(log, "exiting with status 7") < 60
    _assert_no_orphans(str(out))
    assert max(r["step"] for r in metrics(out)) < 20


def test_hung_rank_times_out(tmp_path):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "run"
    args = run_args(tmp_path, corpus, "run", ["train.max_steps=20", "train.save_every=100",
                                              "train.micro_batch_size=2", "parallel.collective_timeout_s=8"])
    rc, log, ended = _run(2, args, tmp_path / "hang.log", faults="hang@3/1")
    hung = _fault_time(log, "hanging at step 3")
    assert rc != 0
    assert 8 <= ended - hung < 8 + 60, f"the job ended {ended - hung:.1f} s after the hang"
    assert re.search(r"[Tt]imed? ?out", log), log[-4000:]
    _assert_no_orphans(str(out))


# ------------------------------------------------------------------------------------------- SIGTERM


def sigterm_after_first_record(n: int, args: list[str], out: Path, log: Path, faults: str) -> str:
    """The launcher's job on n ranks, SIGTERMed as a whole (as a scheduler's pre-emption does) once ``out`` has
    a metrics record; waits for every rank to finish, leaves no process behind. -> the job's output."""
    p = _start(n, args, log, faults=faults)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and metrics(out)) and time.time() < deadline:
            time.sleep(0.2)
        assert metrics(out), log.read_text()[-3000:]
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=60)
        deadline = time.time() + 60             # the ranks outlive the launcher's own exit while saving
        while _job_processes(str(out)) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        _assert_no_orphans(str(out), grace=0)
        _kill_leftovers(p)
    return log.read_text()


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    corpus = make_corpus(tmp_path)
    common = ["train.max_steps=8", "train.save_every=100", "train.micro_batch_size=2"]
    spawn_ranks(2, run_args(tmp_path, corpus, "full", common))      # the reference: no signal

    out = tmp_path / "split"
    split = run_args(tmp_path, corpus, "split", common)
    log = sigterm_after_first_record(2, split, out, tmp_path / "term.log", faults="sleep=1@1-8")   # slow steps
    stopped = _steps(out)
    assert len(stopped) == 1 and 1 <= stopped[0] < 8, log[-3000:]
    assert f"stopped by SIGTERM at step {stopped[0]}" in log

    spawn_ranks(2, split + ["train.resume=auto"])
    full = {r["step"]: r for r in metrics(tmp_path / "full")}
    resumed = {r["step"]: r for r in metrics(out)}      # later records of a step overwrite earlier ones
    assert sorted(resumed) == list(range(1, 9))
    for s in range(1, 9):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert resumed[s][key] == full[s][key], f"step {s} {key}"


# --------------------------------------------------------------------------------- non-finite steps


def test_nonfinite_on_one_rank_skips_the_step_everywhere(tmp_path):
    """ep=2, ZeRO-1: a NaN loss on rank 1 at step 3 skips step 3 on both ranks (weights, biases
    and optimizer state unchanged); inf at steps 5-7 on rank 0 stops the run after 3 skips in a
    row with a checkpoint holding step 4's state."""
    corpus = make_corpus(tmp_path)
    out = tmp_path / "run"
    args = run_args(tmp_path, corpus, "run", ["train.max_steps=10", "train.save_every=1", "train.keep_last=20",
                                              "train.micro_batch_size=2", "parallel.ep=2",
                                              "train.max_consecutive_skips=3"])
    rc, log, _ = _run(2, args, tmp_path / "nan.log", faults="nan_loss@3/1;inf_loss@5-7/0")
    assert rc == 3, log[-4000:]
    # each rank says so (two ranks writing at once may put both messages on one line of the log)
    assert log.count("3 optimizer steps in a row") == log.count("stopped at step 7") == 2, log[-3000:]
    rec = {r["step"]: r for r in metrics(out)}
    assert sorted(rec) == list(range(1, 8))
    assert [s for s in rec if rec[s]["skipped"]] == [3, 5, 6, 7]
    assert rec[3]["skipped_steps"] == 1 and rec[7]["skipped_steps"] == 4
    assert _steps(out) == list(range(1, 8))

    ck = {s: out / "checkpoints" / checkpoint.checkpoint_name(s) for s in range(1, 8)}

    def same_state(a: int, b: int) -> bool:
        # every rank's shard: fp32 masters, both AdamW moments and the router biases, byte for byte
        shards = sorted(p.name for p in (ck[a] / checkpoint.SHARDS).glob("*.safetensors"))
        return all((ck[a] / checkpoint.SHARDS / f).read_bytes() == (ck[b] / checkpoint.SHARDS / f).read_bytes()
                   for f in shards)

    assert len(list((ck[1] / checkpoint.SHARDS).glob("*.safetensors"))) == 2, "not one shard per rank"
    assert same_state(2, 3), "the skipped step 3 changed the state"
    assert not same_state(3, 4), "step 4 did not train"
    assert same_state(4, 7), "the skipped steps 5-7 changed the state"
    b3 = weight_reader.read_biases(ck[3])
    assert all(torch.isfinite(v).all() for v in b3.values())


def test_nonfinite_with_the_plain_optimizer(tmp_path):
    """ZeRO stage 0 in fp32 runs the trainer's FiniteAdamW: the same skip on one process."""
    corpus = make_corpus(tmp_path)
    out = tmp_path / "run"
    p = train(run_args(tmp_path, corpus, "run", ["train.max_steps=3", "train.save_every=1", "train.keep_last=5",
                                                 "deepspeed.zero_optimization.stage=0"]),
              env={"MOE_FAULTS": "nan_loss@2"})
    rec = {r["step"]: r for r in metrics(out)}
    assert [s for s in rec if rec[s]["skipped"]] == [2] and rec[3]["skipped_steps"] == 1, p.stdout[-2000:]
    c1, c2, c3 = (out / "checkpoints" / checkpoint.checkpoint_name(s) / checkpoint.SHARDS / "shard-00000.safetensors"
                  for s in (1, 2, 3))
    assert c1.read_bytes() == c2.read_bytes() != c3.read_bytes()


# ------------------------------------------------------------------------------- untrusted checkpoints


def test_checkpoint_pickle_payload_is_refused_and_never_runs(tmp_path):
    """The sharded state is safetensors + JSON only: a pickle dropped in as DCP's usual ``.metadata``
    is never opened, and one in place of a shard is refused, naming the file."""
    corpus = make_corpus(tmp_path)
    out = tmp_path / "run"
    args = run_args(tmp_path, corpus, "run", ["train.max_steps=1", "train.save_every=1", "train.keep_last=5"])
    train(args)
    ck = checkpoint.complete_checkpoints(str(out))[-1]
    sentinel = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save({"payload": PicklePayload(sentinel)}, buf)                # DCP's usual pickled index file
    (ck / checkpoint.SHARDS / ".metadata").write_bytes(buf.getvalue())
    manifest.write_manifest(ck)         # an attacker can re-hash: the manifest is not a signature
    train(args + ["train.max_steps=2", "train.resume=auto"])
    assert not sentinel.exists()

    target = ck / checkpoint.SHARDS / "shard-00000.safetensors"
    torch.save({"payload": PicklePayload(sentinel)}, target)
    manifest.write_manifest(ck)
    p = train(args + ["train.max_steps=2", f"train.resume={ck}"], check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert f"{target} is not a readable safetensors file" in p.stderr, p.stderr[-3000:]
    assert not sentinel.exists()


def test_explicit_resume_from_a_missing_checkpoint_fails(tmp_path):
    corpus = make_corpus(tmp_path)
    missing = tmp_path / "nowhere" / "step_0000100"
    p = train(run_args(tmp_path, corpus, "run", ["train.max_steps=1", f"train.resume={missing}"]), check=False)
    assert p.returncode == 2
    assert f"train.resume={str(missing)!r}: checkpoint path does not exist" in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
