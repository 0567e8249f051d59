"""``deepspeed --num_gpus 2 train.py`` on CPU (gloo): two data-parallel ranks train, and the
bias update sums routed-token counts over both ranks, so 2 ranks x 2 rows give the same
biases as 1 rank x 4 rows (the same global batches, by the sampler's construction)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from model.hf import weight_reader
from parallel.state import checkpoint
from tests.helpers import free_port
from tests.train_helpers import ROOT, clean_env, make_corpus, metrics, run_args, train


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_on_cpu(tmp_path):
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    corpus = make_corpus(tmp_path)
    common = ["train.max_steps=3", "train.save_every=100", "deepspeed.zero_optimization.stage=2"]
    two = run_args(tmp_path, corpus, "two", common + ["train.micro_batch_size=2"])
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(ROOT / "train.py"), *two]
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    # DeepSpeed's CPU shared-memory all-reduce buffers (~69 MB per rank, never removed) are not made
    leaked = [f.name for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert not leaked, leaked
    one = run_args(tmp_path, corpus, "one", common + ["train.micro_batch_size=4"])
    train(one)

    m2, m1 = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in m2] == [1, 2, 3]
    run2 = (tmp_path / "two" / "run.json").read_text()
    assert '"world_size": 2' in run2
    for a, b in zip(m1, m2):   # same global batches: the same losses up to float summation order
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-4)
    # the 2-rank checkpoint has both ranks' files and a marker
    ck2 = checkpoint.complete_checkpoints(str(tmp_path / "two"))[-1]
    assert (ck2 / "rng_rank0.safetensors").is_file() and (ck2 / "rng_rank1.safetensors").is_file()
    # counts summed over ranks: the same sign-rule updates as one rank seeing the whole batch
    b2 = weight_reader.read_biases(ck2)
    b1 = weight_reader.read_biases(checkpoint.complete_checkpoints(str(tmp_path / "one"))[-1])
    same = sum(int((b1[k] == b2[k]).sum()) for k in b1)
    total = sum(b1[k].numel() for k in b1)
    assert same >= 0.9 * total, f"only {same}/{total} bias entries agree between 1 and 2 ranks"
    assert any(b2[k].abs().sum() > 0 for k in b2)
