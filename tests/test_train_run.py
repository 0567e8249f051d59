"""Short real ``python train.py`` runs: resume exactness, checkpoints on disk, bad inputs.

Each run is a subprocess with a clean environment (its own 1-process gloo group), a
~0.1M-parameter model and a corpus written into tmp_path.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from data import load_tokenizer
from model.hf import weight_reader
from parallel.state import checkpoint
from tests.train_helpers import ROOT, make_corpus, metrics, run_args, train

KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm", "lr", "expert_load_imbalance", "val_loss")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_resume_is_bit_exact_mid_epoch(tmp_path, corpus):
    """N steps, stop, resume to 2N == an uninterrupted 2N run, step by step, bit for bit."""
    n = 5
    # ~4 steps per epoch; default (fast) kernels: the MoE permute uses index_select, whose
    # backward sums in a fixed order, so no torch.use_deterministic_algorithms is needed
    common = [f"train.max_steps={2 * n}", "train.save_every=100", "train.micro_batch_size=16"]
    full = run_args(tmp_path, corpus, "full", common)
    train(full)
    split = run_args(tmp_path, corpus, "split", common + ["train.keep_last=1"])
    train(split + [f"train.stop_at={n}"])
    saved = checkpoint.complete_checkpoints(str(tmp_path / "split"))
    assert [p.name for p in saved] == [checkpoint.checkpoint_name(n)]
    state = json.loads((saved[0] / checkpoint.STATE).read_text())
    steps_per_epoch = state["sampler"]["num_rows"] // state["sampler"]["global_batch_size"]
    assert state["sampler"]["epoch"] >= 1 and state["sampler"]["position"] > 0, "stop is not mid-epoch"
    assert n % steps_per_epoch != 0
    train(split + ["train.resume=auto"])

    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 2 * n + 1))
    for ra, rb in zip(a, b):
        for k in KEYS:
            assert ra.get(k) == rb.get(k), f"step {ra['step']}: {k} {ra.get(k)!r} != {rb.get(k)!r}"
    # the final checkpoints hold identical balancing biases
    ba = weight_reader.read_biases(checkpoint.complete_checkpoints(str(tmp_path / "full"))[-1])
    bb = weight_reader.read_biases(checkpoint.complete_checkpoints(str(tmp_path / "split"))[-1])
    assert ba.keys() == bb.keys() and all((ba[k] == bb[k]).all() for k in ba)
    assert any(ba[k].abs().sum() > 0 for k in ba)          # the bias update ran


def test_metrics_checkpoints_and_keep_last(tmp_path, corpus):
    args = run_args(tmp_path, corpus, "run", ["train.max_steps=6", "train.save_every=2", "train.keep_last=2",
                                              "train.log_every=3", "model.mtp_loss_weight=0.3",
                                              "train.mtp_loss_weight_late=0.1", "train.mtp_late_fraction=0.5"])
    p = train(args)
    recs = metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 3, 4, 6]               # log_every, first step, eval steps
    # DeepSeek-V3's MTP schedule: 0.3 for optimizer steps 0-2 (logged as steps 1-3), then 0.1
    assert [r["mtp_weight"] for r in recs] == [0.3, 0.3, 0.1, 0.1]
    for r in recs:
        for k in ("step", "loss", "lm_loss", "aux_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                  "expert_load_imbalance"):
            assert k in r, k
        assert len(r["expert_load_imbalance"]) == 2                # 1 MoE layer + 1 MTP MoE layer
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"] + r["mtp_loss"], rel=1e-5)
    assert "val_loss" in recs[2] and "val_loss" in recs[3]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["peak_flops"] > 0
    names = [c.name for c in checkpoint.complete_checkpoints(str(tmp_path / "run"))]
    assert names == ["step_0000004", "step_0000006"]
    files = {f.name for f in (tmp_path / "run" / "checkpoints" / "step_0000006").iterdir()}
    assert files == {"COMPLETE", "MANIFEST.json", "trainer_state.json", "state", "rng_rank0.safetensors", "tokenizer"}
    state = {f.name for f in (tmp_path / "run" / "checkpoints" / "step_0000006" / checkpoint.SHARDS).iterdir()}
    assert state == {"shard-00000.safetensors", "index.json"}
    assert not list((tmp_path / "run").rglob("zero_to_*.py"))     # DeepSpeed's unpickling helpers
    assert "saved" in p.stdout

    # a half-written newer checkpoint is ignored by resume=auto ...
    half = tmp_path / "run" / "checkpoints" / "step_0000008"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_0000006", half)
    (half / "COMPLETE").unlink()
    p = train(args + ["train.max_steps=7", "train.resume=auto"])
    assert "resuming from" in p.stdout and "step_0000006" in p.stdout
    assert metrics(tmp_path / "run")[-1]["step"] == 7
    # ... and an incompatible model or a missing path is a clear error with a non-zero exit
    p = train(args + ["train.resume=auto", "train.max_steps=8", "model.hidden_size=96"], check=False)
    assert p.returncode != 0 and "model.hidden_size=64" in p.stderr and "model.hidden_size=96" in p.stderr
    p = train(args + [f"train.resume={tmp_path / 'nope'}"], check=False)
    assert p.returncode != 0 and "nope" in p.stderr and "does not exist" in p.stderr

    # the run's curves: scripts/plot_metrics.py draws loss, lr and expert load into a PNG
    plot = [sys.executable, str(ROOT / "scripts" / "plot_metrics.py")]
    png = tmp_path / "curves.png"
    p = subprocess.run(plot + [str(tmp_path / "run"), "--out", str(png)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import matplotlib.image
    img = matplotlib.image.imread(str(png))                         # a real PNG, 3 stacked panels
    assert img.shape[0] > img.shape[1] > 300 and img[..., :3].std() > 0
    p = subprocess.run(plot + [str(tmp_path / "nope")], capture_output=True, text=True)
    assert p.returncode != 0 and "metrics.jsonl not found" in p.stderr


def test_bad_inputs_name_the_path_or_field(tmp_path, corpus):
    base = run_args(tmp_path, corpus, "bad", ["train.max_steps=1"])

    def fails(*extra):
        p = train(base + list(extra), check=False)
        assert p.returncode == 2, p.stderr[-2000:]
        return p.stderr

    missing = tmp_path / "no_such_corpus"
    assert str(missing) in fails(f"data.path={missing}")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in fails(f"data.path={empty}")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": f"doc {i} " * 50}) + "\n" for i in range(20)))
    err = fails(f"data.path={jsonl}")
    assert "'text'" in err and "content" in err
    # a tokenizer whose ids do not fit the model's vocabulary
    train(base + ["train.out_dir=" + str(tmp_path / "tok_run")])
    tok = tmp_path / "cache" / "tokenizer"
    n_tok = len(load_tokenizer(str(tok)))
    err = fails(f"data.tokenizer={tok}", f"model.vocab_size={n_tok - 1}")
    assert str(tok) in err and f"vocab_size={n_tok - 1}" in err
    assert "train.max_steps" in fails("train.max_steps=0")


def test_bf16_grad_accum_activation_checkpointing_and_wandb_offline(tmp_path, corpus):
    secret = "not-a-real-key-4f1c9e"
    train(run_args(tmp_path, corpus, "x", ["train.max_steps=2", "train.dtype=bf16", "train.grad_accum=2",
                                          "train.activation_checkpointing=true", "logging.wandb=offline"]),
          env={"WANDB_API_KEY": secret, "HF_TOKEN": secret, "WANDB_SILENT": "true"})
    recs = metrics(tmp_path / "x")
    assert [r["step"] for r in recs] == [1, 2] and all(r["loss"] < 9 for r in recs)
    bias = weight_reader.read_biases(checkpoint.complete_checkpoints(str(tmp_path / "x"))[-1])
    assert all(b.dtype == torch.float32 for b in bias.values())   # balancing state stays fp32 under bf16
    wandb_files = [f for f in (tmp_path / "x" / "wandb").rglob("*") if f.is_file()]
    assert wandb_files
    assert not any(secret.encode() in f.read_bytes() for f in wandb_files)


def test_embedded_default_corpus_trains_and_is_cached(tmp_path):
    """data.path null (the README's main command): the Python standard library's own sources,
    a BPE trained on them, token shards written once and reused by the next run unchanged."""
    cache = tmp_path / "cache"
    args = run_args(tmp_path, tmp_path, "default", ["data.path=null", "data.max_files=40", "data.seq_len=64",
                                                    "train.max_steps=2", "train.save_every=100"])
    train(args)
    shards = sorted(cache.glob("shards-*/*"))
    meta = json.loads(next(cache.glob("shards-*/meta.json")).read_text())
    assert meta["corpus_path"].startswith("<default corpus") and (cache / "tokenizer" / "tokenizer.json").is_file()
    assert any(p.name.startswith("train_") for p in shards) and any(p.name.startswith("val_") for p in shards)
    stamps = {p: p.stat().st_mtime_ns for p in shards + [cache / "tokenizer" / "tokenizer.json"]}
    recs = metrics(tmp_path / "default")
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["lm_loss"] == pytest.approx(6.24, abs=0.5)  # ~ln 512

    p = train(args[:-2] + ["train.max_steps=3", "train.resume=auto"])
    assert "resuming from" in p.stdout and "step_0000002" in p.stdout
    assert sorted(cache.glob("shards-*/*")) == shards
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "the second run rebuilt the cache"
    assert metrics(tmp_path / "default")[-1]["step"] == 3


def test_compiled_blocks_train_like_eager(tmp_path, corpus):
    """train.compile=true: the same losses, gradient norms and expert loads step by step as
    eager (inductor fuses the elementwise work; the GEMMs and the MoE dispatch are unchanged)."""
    common = ["train.max_steps=3", "train.save_every=100", "model.num_nextn_predict_layers=1"]
    train(run_args(tmp_path, corpus, "eager", common))
    p = train(run_args(tmp_path, corpus, "compiled", common + ["train.compile=true"]), timeout=600)
    assert "torch.compile on 4 blocks" in p.stdout                 # 2 layers + 1 MTP block + final norm
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5), (ra["step"], k)
        assert rb["expert_load_imbalance"] == ra["expert_load_imbalance"]
    # parameter names (what checkpoints and exports read) are unchanged by the in-place compile
    saved = weight_reader.read_weights(checkpoint.complete_checkpoints(str(tmp_path / "compiled"))[-1])
    ref = weight_reader.read_weights(checkpoint.complete_checkpoints(str(tmp_path / "eager"))[-1])
    assert saved.keys() == ref.keys() and not any("_orig_mod" in k for k in saved)
