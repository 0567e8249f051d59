"""Trainer pieces without a training run: LR schedules, the DeepSpeed config merge, the
bias update rule, activation checkpointing's token counts, checkpoint selection and
pruning, and the compatibility checks on resume."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from configs.schema import load_config
from model.recompute import apply_activation_checkpointing
from model.schedules import gamma_at, lr_at
from model.transformer import DeepseekV3
from parallel.balance import gather_counts, imbalance, update_biases
from parallel.engine import check_supported, deepspeed_config, param_groups
from parallel.state import checkpoint
from tests.train_helpers import TINY_MODEL


def _train(**kw):
    return load_config(None, [f"train.{k}={v}" for k, v in kw.items()]).train


# ---- LR schedules ----

def test_cosine_schedule():
    t = _train(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4, lr_schedule="cosine")
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)       # linear warmup to lr
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                        # then non-increasing
    assert lrs[99] == pytest.approx(1e-4)                                          # min_lr at the last step
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), t) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_wsd_and_constant_schedules():
    t = _train(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5, lr_schedule="wsd", wsd_decay_fraction=0.2)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[9] == lrs[50] == lrs[79] == pytest.approx(1e-3)                     # stable phase
    assert all(a > b for a, b in zip(lrs[79:99], lrs[80:100]))                     # decay over the last 20%
    assert lrs[99] == pytest.approx(1e-5)
    c = _train(max_steps=50, warmup_steps=5, lr=1e-3, lr_schedule="constant")
    assert [lr_at(s, c) for s in (4, 5, 49)] == pytest.approx([1e-3, 1e-3, 1e-3])
    assert lr_at(0, c) == pytest.approx(2e-4)


def test_schedule_length_comes_from_config_not_from_stop():
    a = _train(max_steps=100, stop_at=30)
    b = _train(max_steps=100)
    assert [lr_at(s, a) for s in range(30)] == [lr_at(s, b) for s in range(30)]


# ---- DeepSpeed config ----

def test_deepspeed_config_is_derived_from_train():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=3", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("override, key", [
    # gradient_accumulation_steps / train_micro_batch_size_per_gpu alone now set the train values:
    # their conflicts are in tests/test_config.py
    ("deepspeed.gradient_clipping=5.0", "deepspeed.gradient_clipping"),
    ("deepspeed.bf16.enabled=true", "deepspeed.bf16.enabled"),
    ("deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage"),
    ("deepspeed.optimizer.type=Adam", "deepspeed.optimizer"),
])
def test_deepspeed_conflicts_name_the_key(override, key):
    cfg = load_config(None, [override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        deepspeed_config(cfg, world_size=1)


def test_agreeing_explicit_values_are_fine_and_bad_layouts_fail():
    cfg = load_config(None, ["deepspeed.gradient_accumulation_steps=1", "deepspeed.gradient_clipping=1.0"])
    deepspeed_config(cfg, world_size=1)
    check_supported(load_config(None, ["parallel.ep=2"]), world_size=4)
    with pytest.raises(ValueError, match=r"parallel\.ep=4: the world size 2"):
        check_supported(load_config(None, ["parallel.ep=4"]), world_size=2)


def test_weight_decay_only_on_matrices():
    model = DeepseekV3(load_config(None, TINY_MODEL).model)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---- balancing ----

def _fake_layers(counts):
    return [SimpleNamespace(tokens_per_expert=torch.tensor(c, dtype=torch.float32),
                            gate=SimpleNamespace(e_score_correction_bias=torch.zeros(len(c))))
            for c in counts]


def test_bias_update_sign_rule():
    layers = _fake_layers([[6.0, 0.0, 3.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    counts = gather_counts(layers)                                   # 1 process: no all_reduce
    assert all(float(m.tokens_per_expert.sum()) == 0 for m in layers)  # read and zeroed
    update_biases(layers, counts, gamma=0.01)
    assert layers[0].gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    assert layers[1].gate.e_score_correction_bias.tolist() == pytest.approx([0.01, 0.01, 0.01, -0.01])
    assert imbalance(counts) == pytest.approx([2.0, 2.5])
    update_biases(layers, counts, gamma=0.0)                         # gamma 0: no change
    assert layers[0].gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])


def test_gamma_stops_after_fraction():
    t = _train(max_steps=100, bias_update_speed=0.001, bias_update_stop_fraction=0.8)
    assert gamma_at(0, t) == gamma_at(79, t) == 0.001
    assert gamma_at(80, t) == gamma_at(99, t) == 0.0


def test_activation_checkpointing_counts_tokens_once():
    cfg = load_config(None, TINY_MODEL).model
    torch.manual_seed(0)
    ref = DeepseekV3(cfg)
    ac = DeepseekV3(cfg)
    ac.load_state_dict(ref.state_dict())
    assert apply_activation_checkpointing(ac) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    outs = []
    for m in (ref, ac):
        m.train()
        out = m(x, x)
        out.loss.backward()
        outs.append((out.loss.detach(), [layer.tokens_per_expert.clone() for layer in m.moe_layers()],
                     [p.grad.clone() for p in m.parameters()]))
    (l0, c0, g0), (l1, c1, g1) = outs
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(c0, c1))           # recomputation did not add counts
    assert float(c0[0].sum()) == 2 * 16 * cfg.num_experts_per_tok
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


# ---- checkpoints ----

def _fake_ckpt(out, step, complete=True):
    p = checkpoint.checkpoint_root(str(out)) / checkpoint.checkpoint_name(step)
    p.mkdir(parents=True)
    (p / checkpoint.STATE).write_text(json.dumps({"step": step}))
    if complete:
        (p / checkpoint.MARKER).write_text("{}")
    return p


def test_half_written_checkpoint_is_never_picked(tmp_path):
    _fake_ckpt(tmp_path, 100)
    _fake_ckpt(tmp_path, 200)
    half = _fake_ckpt(tmp_path, 300, complete=False)
    assert checkpoint.resolve_resume("auto", str(tmp_path)).name == "step_0000200"
    assert checkpoint.resolve_resume(None, str(tmp_path)) is None
    assert checkpoint.resolve_resume("auto", str(tmp_path / "nothing_here")) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(half), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.resolve_resume(str(tmp_path / "missing"), str(tmp_path))
    # a run directory given as the path resumes from its newest complete checkpoint
    assert checkpoint.resolve_resume(str(tmp_path), "elsewhere").name == "step_0000200"


def test_keep_last_prunes_old_complete_and_stale_partial(tmp_path):
    for s in (10, 20, 30, 40):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 35, complete=False)   # a crashed save older than the newest complete one
    _fake_ckpt(tmp_path, 50, complete=False)   # newer than every complete one: left alone
    checkpoint.prune(str(tmp_path), keep_last=2)
    left = sorted(p.name for p in checkpoint.checkpoint_root(str(tmp_path)).iterdir())
    assert left == ["step_0000030", "step_0000040", "step_0000050"]


def test_incompatible_checkpoint_names_the_field(tmp_path):
    cfg = load_config(None, TINY_MODEL)
    state = {"config": cfg.to_dict(), "tokenizer_fingerprint": "abc"}
    checkpoint.check_compatible(state, tmp_path, cfg.model.to_dict(), "abc")
    other = load_config(None, TINY_MODEL + ["model.hidden_size=96", "model.mtp_loss_weight=0.1"]).model.to_dict()
    with pytest.raises(ValueError, match=r"model\.hidden_size=64.*model\.hidden_size=96"):
        checkpoint.check_compatible(state, tmp_path, other, "abc")
    with pytest.raises(ValueError, match="another tokenizer"):
        checkpoint.check_compatible(state, tmp_path, cfg.model.to_dict(), "def")
    relaxed = dict(cfg.model.to_dict(), mtp_loss_weight=0.1)         # training-only fields may change
    checkpoint.check_compatible(state, tmp_path, relaxed, "abc")
