"""Expert parallelism through the real entry point: ``train.py parallel.ep=N`` on N ranks (gloo,
started as DeepSpeed's launcher starts them: tests.train_helpers.spawn_ranks) against one process
that sees the same global batch through gradient accumulation. Per-step losses and the balancing
biases must agree, with the all-to-all overlap on and off."""
from __future__ import annotations

import pytest
import torch

from model.hf import weight_reader
from parallel.state import checkpoint
from tests.train_helpers import make_corpus, metrics, run_args, spawn_ranks, train

STEPS = 5
CLIP = 0.05      # below every step's gradient norm: clipping is active throughout
COMMON = [f"train.max_steps={STEPS}", "train.save_every=100", "train.micro_batch_size=1", f"train.grad_clip={CLIP}"]



def _biases(out_dir):
    return weight_reader.read_biases(checkpoint.complete_checkpoints(str(out_dir))[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with gradient accumulation over `world` micro-batches: the oracle, run once per
    world size for the whole module (same corpus, same data cache)."""
    root = tmp_path_factory.mktemp("ep_reference")
    corpus, runs = make_corpus(root), {}

    def get(world: int):
        if world not in runs:
            out = f"one_{world}"
            train(run_args(root, corpus, out, COMMON + [f"train.grad_accum={world}"]))
            runs[world] = metrics(root / out), _biases(root / out)
        return root, corpus, runs[world]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("world,ep,stage,overlaps", [(2, 2, 1, ("true", "false")), (4, 4, 1, ("true",)),
                                                     (4, 2, 0, ("true",))])
def test_ep_training_equals_one_process_with_accumulation(reference, world, ep, stage, overlaps):
    """The clip threshold is below every step's gradient norm, so a norm that is not the true
    global one (expert and non-expert, over every rank) changes the next step's loss. (4, 2, 0):
    expert gradients are averaged over an expert-data-parallel group of 2, and ZeRO stage 0
    clips through the trainer's own optimizer (DeepSpeed's averages per-rank norms)."""
    root, corpus, (ref, ref_bias) = reference(world)
    assert all(r["grad_norm"] > CLIP for r in ref), [r["grad_norm"] for r in ref]
    for overlap in overlaps:
        out = f"ep{ep}_of_{world}_stage{stage}_{overlap}"
        spawn_ranks(world, run_args(root, corpus, out, COMMON + [
            f"parallel.ep={ep}", f"parallel.overlap={overlap}", f"deepspeed.zero_optimization.stage={stage}"]))
        got = metrics(root / out)
        assert [r["step"] for r in got] == list(range(1, STEPS + 1))
        for a, b in zip(ref, got):
            for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), f"step {a['step']} {key}"
            assert b["dispatch_bytes"] > 0 and b["combine_bytes"] > 0
        bias = _biases(root / out)
        for k in ref_bias:   # same routing => the same integer counts => identical sign-rule updates
            torch.testing.assert_close(bias[k], ref_bias[k], rtol=0, atol=1e-7, msg=k)


@pytest.mark.slow
def test_ep_resume_continues_like_an_uninterrupted_run(tmp_path):
    """ep=2: 3 steps, stop, resume to 6 == 6 uninterrupted steps (each rank gets its own experts back)."""
    corpus = make_corpus(tmp_path)
    common = ["train.max_steps=6", "train.save_every=100", "train.micro_batch_size=2", "parallel.ep=2"]
    spawn_ranks(2, run_args(tmp_path, corpus, "full", common))
    split = run_args(tmp_path, corpus, "split", common)
    spawn_ranks(2, split + ["train.stop_at=3"])
    spawn_ranks(2, split + ["train.resume=auto"])
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert a[key] == b[key], f"step {a['step']} {key}: {a[key]} != {b[key]}"


@pytest.mark.slow
def test_fp8_training_with_fp8_dispatch_through_train_py(tmp_path):
    """fp8.enabled (emulated on CPU) and parallel.fp8_dispatch through the real entry point:
    the backend choice is logged, and ep=2 with E4M3 dispatch tracks one process running the
    same FP8 model on the same global batch (dispatch rounding is the only difference)."""
    corpus = make_corpus(tmp_path)
    common = ["train.max_steps=4", "train.save_every=100", "train.micro_batch_size=2", "fp8.enabled=true"]
    one = train(run_args(tmp_path, corpus, "one", common + ["train.grad_accum=2"]))
    assert "fp8: backend auto (emulated" in one.stdout
    two = spawn_ranks(2, run_args(tmp_path, corpus, "ep2", common + ["parallel.ep=2", "parallel.fp8_dispatch=true"]))
    assert "fp8: backend auto (emulated" in two.stdout + two.stderr
    ref, got = metrics(tmp_path / "one"), metrics(tmp_path / "ep2")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-2), f"step {a['step']}"
        assert "dispatch_bytes" not in a and b["dispatch_bytes"] > 0
