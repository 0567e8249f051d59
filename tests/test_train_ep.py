"""Expert parallelism through the real entry point: ``deepspeed --num_gpus N train.py
parallel.ep=N`` on CPU (gloo) against one process that sees the same global batch through
gradient accumulation. Per-step losses and the balancing biases must agree, with the
all-to-all overlap on and off."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from parallel import checkpoint
from tests.train_helpers import launch, make_corpus, metrics, run_args, train

STEPS = 5



def _biases(out_dir):
    return load_file(str(checkpoint.complete_checkpoints(str(out_dir))[-1] / checkpoint.BIAS))


@pytest.mark.slow
@pytest.mark.parametrize("world,overlaps", [(2, ("true", "false")), (4, ("true",))])
def test_ep_training_equals_one_process_with_accumulation(tmp_path, world, overlaps):
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    corpus = make_corpus(tmp_path)
    common = [f"train.max_steps={STEPS}", "train.save_every=100", "train.micro_batch_size=1"]
    train(run_args(tmp_path, corpus, "one", common + [f"train.grad_accum={world}"]))
    ref = metrics(tmp_path / "one")
    ref_bias = _biases(tmp_path / "one")
    for overlap in overlaps:
        out = f"ep{world}_{overlap}"
        launch(world, run_args(tmp_path, corpus, out, common + [f"parallel.ep={world}",
                                                                 f"parallel.overlap={overlap}"]))
        got = metrics(tmp_path / out)
        assert [r["step"] for r in got] == list(range(1, STEPS + 1))
        for a, b in zip(ref, got):
            for key in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), f"step {a['step']} {key}"
            assert b["dispatch_bytes"] > 0 and b["combine_bytes"] > 0
        bias = _biases(tmp_path / out)
        for k in ref_bias:   # same routing => the same integer counts => identical sign-rule updates
            torch.testing.assert_close(bias[k], ref_bias[k], rtol=0, atol=1e-7, msg=k)


@pytest.mark.slow
def test_ep_resume_continues_like_an_uninterrupted_run(tmp_path):
    """ep=2: 3 steps, stop, resume to 6 == 6 uninterrupted steps (each rank gets its own experts back)."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    corpus = make_corpus(tmp_path)
    common = ["train.max_steps=6", "train.save_every=100", "train.micro_batch_size=2", "parallel.ep=2"]
    launch(2, run_args(tmp_path, corpus, "full", common))
    split = run_args(tmp_path, corpus, "split", common)
    launch(2, split + ["train.stop_at=3"])
    launch(2, split + ["train.resume=auto"])
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert a[key] == b[key], f"step {a['step']} {key}: {a[key]} != {b[key]}"
