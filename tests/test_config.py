"""Config validation: every bad value raises a ValueError naming the field and the value."""
import pytest

from configs import load_config

PRESETS = ["tiny", "small", "deepseek_v3_16b", "deepseek_v3_671b"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.n_routed_experts % cfg.parallel.ep == 0


def test_default_is_tiny_and_overrides_parse():
    cfg = load_config(None, ["train.lr=3e-4", "model.q_lora_rank=null", "train.max_steps=7"])
    assert cfg.train.lr == 3e-4 and cfg.model.q_lora_rank is None and cfg.train.max_steps == 7
    assert cfg.model.hidden_size == 256


BAD = [
    (["model.num_experts_per_tok=17"], "model.num_experts_per_tok=17"),
    (["model.topk_group=5"], "model.topk_group=5"),
    (["model.n_group=3"], "model.n_group=3"),                    # 16 experts not divisible by 3
    (["model.n_group=16"], "model.n_group=16"),                  # 1 expert per group
    (["model.num_key_value_heads=2"], "model.num_key_value_heads=2"),
    (["model.qk_rope_head_dim=15"], "model.qk_rope_head_dim=15"),
    (["model.first_k_dense_replace=9"], "model.first_k_dense_replace=9"),
    (["model.hidden_act=gelu"], "model.hidden_act='gelu'"),
    (["model.hidden_size=0"], "model.hidden_size=0"),
    (["model.hidden_size=12.5"], "model.hidden_size=12.5"),
    (["model.rope_scaling={type: yarn}"], "model.rope_scaling"),
    (["model.topk_group=1", "model.num_experts_per_tok=5"], "model.num_experts_per_tok=5"),
    (["model.not_a_field=1"], "not_a_field"),
    (["train.lr_schedule=linear"], "train.lr_schedule='linear'"),
    (["train.max_steps=0"], "train.max_steps=0"),
    (["train.compile=true", "train.activation_checkpointing=true"],
     "train.compile=true with train.activation_checkpointing"),
    (["train.compile=fast"], "train.compile='fast'"),
    (["model.loss_impl=fused"], "model.loss_impl='fused'"),
    (["parallel.ep=3"], "parallel.ep=3"),
    (["model.n_routed_experts=24", "model.n_group=4", "parallel.ep=6"], "parallel.ep=6: router groups"),
    (["data.seq_len=4096"], "data.seq_len=4096"),
    (["logging.wandb=maybe"], "logging.wandb='maybe'"),
    (["fp8.enabled=yes please"], "fp8.enabled='yes please'"),
    (["bogus.key=1"], "bogus"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_values_name_field_and_value(overrides, needle):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert needle in str(e.value), str(e.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_deepspeed_batch_keys_alone_set_the_train_values():
    """A DeepSpeed user's habit: the batch keys written in the deepspeed section only."""
    from parallel.engine import deepspeed_config

    cfg = load_config(None, ["deepspeed.gradient_accumulation_steps=4", "deepspeed.train_micro_batch_size_per_gpu=2"])
    ds = deepspeed_config(cfg, world_size=2)
    assert (cfg.train.grad_accum, cfg.train.micro_batch_size) == (4, 2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["train_batch_size"] == 16
    deepspeed_config(cfg, world_size=2)              # called again (train.py does): still agrees
    same = load_config(None, ["train.grad_accum=3", "deepspeed.gradient_accumulation_steps=3"])
    assert deepspeed_config(same, 1)["gradient_accumulation_steps"] == 3


@pytest.mark.parametrize("overrides, needle", [
    (["train.grad_accum=3", "deepspeed.gradient_accumulation_steps=2"],
     r"deepspeed\.gradient_accumulation_steps=2 conflicts with train\.grad_accum \(= 3\)"),
    (["train.micro_batch_size=4", "deepspeed.train_micro_batch_size_per_gpu=3"],
     r"deepspeed\.train_micro_batch_size_per_gpu=3 conflicts with train\.micro_batch_size \(= 4\)"),
    (["deepspeed.train_micro_batch_size_per_gpu=2", "deepspeed.train_batch_size=5"],
     r"deepspeed\.train_batch_size=5 conflicts with train\.micro_batch_size x train\.grad_accum"),
    (["deepspeed.gradient_accumulation_steps=0"],
     r"deepspeed\.gradient_accumulation_steps=0: must be a positive integer"),
    (["deepspeed.train_micro_batch_size_per_gpu=two"], r"deepspeed\.train_micro_batch_size_per_gpu='two': must be"),
])
def test_deepspeed_batch_conflicts_stay_errors(overrides, needle):
    from parallel.engine import deepspeed_config

    with pytest.raises(ValueError, match=needle):
        deepspeed_config(load_config(None, overrides), world_size=1)
