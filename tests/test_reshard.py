"""Resharding: a sharded checkpoint saved at parallel.ep=2 on 2 processes (ZeRO-1) resumes at ep=1
on 1 process, at ep=4 on 4 processes and at ZeRO-2, and the following steps agree with resuming
unchanged on 2.

Same global batch throughout (4 rows: 2 procs x 2, 1 proc x 2 x grad_accum 2, 4 procs x 1).
Step 4's loss checks the weights; its gradient norm the gradients of every expert; step 5's
loss the AdamW update of step 4, i.e. the resharded moments, step count and fp32 masters."""
from __future__ import annotations

import pytest
import torch

from model.hf import weight_reader
from model.hf.flat_shards import read_index
from parallel.state import checkpoint
from tests.train_helpers import make_corpus, metrics, run_args, spawn_ranks, train

STEPS = 5
SAVED = 3


def _final_weights(out_dir):
    return weight_reader.read_weights(checkpoint.complete_checkpoints(str(out_dir))[-1])


@pytest.mark.slow
def test_ep2_checkpoint_resumes_at_ep1_and_ep4(tmp_path):
    corpus = make_corpus(tmp_path)
    common = [f"train.max_steps={STEPS}", "train.save_every=100", "train.eval_batches=0"]
    # the reference: ep=2 on 2 processes, uninterrupted, saving at step 3 (a resume on the same layout
    # continues it bit for bit: test_train_ep.py::test_ep_resume_continues_like_an_uninterrupted_run)
    spawn_ranks(2, run_args(tmp_path, corpus, "same", common + ["train.micro_batch_size=2", "parallel.ep=2",
                                                                f"train.save_every={SAVED}", "train.keep_last=5"]))
    ckpt = tmp_path / "same" / "checkpoints" / checkpoint.checkpoint_name(SAVED)
    index = read_index(ckpt / checkpoint.SHARDS)
    chunks = index["exp_avg/layers.1.mlp.experts.w_down"]["chunks"]   # one slice per EP rank, no gather
    assert sorted(c["file"] for c in chunks) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    dense = {k: v for k, v in index.items() if k.startswith("exp_avg/") and ".experts." not in k}
    # ZeRO-1: each rank writes its partition of the flat buffer, so both shards hold dense slices
    assert {c["file"] for v in dense.values() for c in v["chunks"]} == {"shard-00000.safetensors",
                                                                         "shard-00001.safetensors"}
    assert all(sum(c["size"][0] for c in v["chunks"]) == v["size"][0] for v in dense.values())

    resume = [f"train.resume={ckpt}"]
    train(run_args(tmp_path, corpus, "ep1", common + resume + ["train.micro_batch_size=2", "train.grad_accum=2"]))
    spawn_ranks(4, run_args(tmp_path, corpus, "ep4", common + resume + ["train.micro_batch_size=1", "parallel.ep=4"]))
    spawn_ranks(2, run_args(tmp_path, corpus, "zero2", common + resume + ["train.micro_batch_size=2", "parallel.ep=2",
                                                                     "deepspeed.zero_optimization.stage=2"]))

    ref = [r for r in metrics(tmp_path / "same") if r["step"] > SAVED]
    assert [r["step"] for r in ref] == [SAVED + 1, STEPS]
    ref_w = _final_weights(tmp_path / "same")
    for out in ("ep1", "ep4", "zero2"):
        got = metrics(tmp_path / out)
        assert [r["step"] for r in got] == [r["step"] for r in ref]
        for a, b in zip(ref, got):
            for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), f"{out} step {a['step']} {key}"
        w = _final_weights(tmp_path / out)     # after step 5's update, gathered over EP
        assert w.keys() == ref_w.keys()
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, out=out, k=k: f"{out} {k}: {m}")

    # a different global batch is refused, naming the fields
    p = train(run_args(tmp_path, corpus, "bad", common + resume + ["train.micro_batch_size=2"]), check=False)
    assert p.returncode == 2 and "train.micro_batch_size" in p.stderr and "train.grad_accum" in p.stderr, p.stderr


@pytest.mark.slow
def test_bf16_without_zero_reshards_ep2_to_one_process(tmp_path):
    """bf16 with ZeRO stage 0 runs DeepSpeed's FP16 optimizer (fp32 master copies outside the
    module): its masters and moments are saved by name and restored on another layout."""
    corpus = make_corpus(tmp_path)
    common = ["train.max_steps=4", "train.save_every=100", "train.eval_batches=0", "train.dtype=bf16",
              "deepspeed.zero_optimization.stage=0"]
    spawn_ranks(2, run_args(tmp_path, corpus, "same", common + ["train.micro_batch_size=2", "parallel.ep=2",
                                                                "train.save_every=2", "train.keep_last=5"]))
    ckpt = tmp_path / "same" / "checkpoints" / checkpoint.checkpoint_name(2)     # the reference, saved at step 2
    weights = weight_reader.open_weights(ckpt)
    assert weights.dtype("embed_tokens.weight") == torch.bfloat16          # as the module holds it
    index = read_index(ckpt / checkpoint.SHARDS)
    assert index["param/embed_tokens.weight"]["dtype"] == "float32"        # the fp32 master, once
    resume = [f"train.resume={ckpt}"]
    train(run_args(tmp_path, corpus, "ep1", common + resume + ["train.micro_batch_size=2", "train.grad_accum=2"]))
    ref, got = [r for r in metrics(tmp_path / "same") if r["step"] > 2], metrics(tmp_path / "ep1")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [3, 4]
    for a, b in zip(ref, got):   # bf16 activations: the layouts differ by bf16 rounding only
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), f"step {a['step']}"


@pytest.mark.slow
def test_zero_offload_checkpoint_reshards_world4_ep2_to_world2_ep1(tmp_path):
    """ZeRO-2 with the optimizer state offloaded to the CPU (DeepSpeedCPUAdam): saved at world 4,
    ep 2 (expert-data-parallel groups of 2) and resumed at world 2, ep 1, the next steps are the
    ones the saved run took (same global batch: 4 x 1 rows, then 2 x 2)."""
    corpus = make_corpus(tmp_path)
    offload = ["deepspeed.zero_optimization.stage=2", "deepspeed.zero_optimization.offload_optimizer.device=cpu",
               "train.max_steps=5", "train.save_every=3", "train.keep_last=5", "train.eval_batches=0"]
    spawn_ranks(4, run_args(tmp_path, corpus, "w4", offload + ["train.micro_batch_size=1", "parallel.ep=2"]))
    ckpt = tmp_path / "w4" / "checkpoints" / checkpoint.checkpoint_name(SAVED)
    assert checkpoint.is_complete(ckpt)
    spawn_ranks(2, run_args(tmp_path, corpus, "w2", offload + ["train.micro_batch_size=2", f"train.resume={ckpt}"]))
    ref = {r["step"]: r for r in metrics(tmp_path / "w4")}
    got = metrics(tmp_path / "w2")
    assert [r["step"] for r in got] == [4, 5]
    for b in got:
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert b[key] == pytest.approx(ref[b["step"]][key], rel=1e-5), f"step {b['step']} {key}"
