"""The public DeepSeek-V3-architecture families, scaled down with their config quirks kept:
import (in the form each ships) -> 3 training steps -> export -> transformers logits parity in fp32.

- Kimi-K2 (configs/kimi_k2.yaml): 384-expert-style wide routing (E/K = 48) with n_group 1 /
  topk_group 1, no MTP, YaRN factor 32 with beta_fast = beta_slow = 1, shipped as FP8 under
  model_type "kimi_k2". Trained through ``python train.py`` with train.init_from, the gradient
  accumulation given DeepSpeed's way (deepspeed.gradient_accumulation_steps alone).
- Moonlight-16B-A3B (configs/moonlight_16b_a3b.yaml): n_group 1, plain q_proj, 2 shared experts,
  no MTP, no RoPE scaling; saved by transformers in bf16.
- DeepSeek-V3/R1/V3.1 (configs/deepseek_v3_671b.yaml): 8 groups top-4, MTP, YaRN factor 40, FP8.
The last two train 3 steps in-process (one AdamW loop, no subprocess) to keep the suite's time: the
train.py path itself is the same for every family and is run once, on the family with most quirks.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from model.config import ModelConfig
from model.hf import from_hf_config, save_hf, to_hf_config, weight_reader
from model.hf.manifest import write_manifest
from model.hf.safetensors_stream import save_streaming
from model.transformer import DeepseekV3
from parallel.state import checkpoint, init_from
from scripts.export_hf import export
from scripts.import_hf import import_hf
from tests.train_helpers import TINY_MODEL, make_corpus, run_args, train

ROOT = Path(__file__).resolve().parents[1]
MAX_ABS = 1e-5
# what DeepSeek-V3-style config.json files carry beside the transformers fields (read and checked)
RELEASE_EXTRAS = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "seq_aux": True,
                  "ep_size": 1, "pretraining_tp": 1}
FAMILIES = {
    # preset, (routed experts, top-k) scaled down, how the family ships
    "kimi_k2": ("kimi_k2", (96, 2), "fp8"),
    "moonlight_16b_a3b": ("moonlight_16b_a3b", (64, 6), "transformers-bf16"),
    "deepseek_v3": ("deepseek_v3_671b", (32, 8), "fp8"),
}


def scaled_down(preset: str, experts: int, top_k: int) -> ModelConfig:
    """The preset's model with tiny widths; routing groups, MTP depth, q_lora on/off, shared experts,
    RoPE scaling (factor, betas, mscale), rope_theta, norms' eps and the routed scaling kept."""
    d = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())["model"]
    d.update(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=16, num_hidden_layers=2,
             first_k_dense_replace=1, num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, bos_token_id=0, eos_token_id=0,
             n_routed_experts=experts, num_experts_per_tok=top_k)
    if d.get("q_lora_rank") is not None:
        d["q_lora_rank"] = 32
    if d.get("rope_scaling"):
        d["rope_scaling"] = dict(d["rope_scaling"], original_max_position_embeddings=16)
        d["max_position_embeddings"] = int(16 * d["rope_scaling"]["factor"])
    else:
        d["max_position_embeddings"] = 256
    return ModelConfig.from_dict(d)


def _source(kind: str, cfg: ModelConfig, path: Path, model_type: str = "deepseek_v3") -> None:
    """An HF directory in the form the family ships: FP8 (DeepSeek's format) or transformers' bf16."""
    torch.manual_seed(0)
    if kind == "fp8":
        m = DeepseekV3(cfg).eval()
        with torch.no_grad():
            for moe in m.moe_layers():
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
        save_hf(m, str(path), dtype=torch.float8_e4m3fn, mtp="inline")
    else:
        from transformers import DeepseekV3ForCausalLM

        DeepseekV3ForCausalLM(to_hf_config(cfg)).to(torch.bfloat16).save_pretrained(str(path))
    c = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**c, **RELEASE_EXTRAS, "model_type": model_type}))


def _trained_in_process(cfg: ModelConfig, init: Path, out: Path) -> Path:
    """3 AdamW steps from the imported weights, saved as a weight directory export_hf.py reads."""
    model = DeepseekV3(cfg)
    init_from.load_init_weights(model, init)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=g)
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    out.mkdir(parents=True)
    save_streaming({k: v.detach() for k, v in model.state_dict().items()}, out / weight_reader.MODEL, {"format": "pt"})
    (out / weight_reader.INIT_CONFIG).write_text(json.dumps({"model": cfg.to_dict()}))
    write_manifest(out)
    return out


def _parity(weights_dir: Path, hf_dir: Path) -> float:
    """Max-abs fp32 logit difference: our model from the trained weights vs transformers' export load."""
    from transformers import AutoModelForCausalLM

    reader = weight_reader.open_weights(weights_dir)
    ours = DeepseekV3(ModelConfig.from_dict(reader.config)).eval()
    ours.load_state_dict({k: reader.read(k).float() for k in reader.names()})
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return (ours(ids).logits - hf(ids).logits).abs().max().item()


def test_scaled_presets_keep_the_family_quirks():
    kimi, moon, dsv3 = (scaled_down(p, *e) for p, e, _ in FAMILIES.values())
    assert (kimi.n_group, kimi.topk_group, kimi.num_nextn_predict_layers) == (1, 1, 0)
    assert kimi.n_routed_experts / kimi.num_experts_per_tok == 384 / 8          # Kimi's sparsity
    assert kimi.rope_scaling["factor"] == 32 and kimi.rope_scaling["beta_fast"] == kimi.rope_scaling["beta_slow"] == 1
    assert ((moon.n_group, moon.topk_group, moon.q_lora_rank, moon.n_shared_experts, moon.rope_scaling)
            == (1, 1, None, 2, None))
    assert (dsv3.n_group, dsv3.topk_group, dsv3.num_nextn_predict_layers, dsv3.rope_scaling["factor"]) == (8, 4, 1, 40)


@pytest.mark.parametrize("family", ["moonlight_16b_a3b", "deepseek_v3"])
def test_family_import_train_export_parity(family, tmp_path):
    preset, experts, kind = FAMILIES[family]
    cfg = scaled_down(preset, *experts)
    _source(kind, cfg, tmp_path / "src")
    import_hf(str(tmp_path / "src"), str(tmp_path / "init"))
    imported = ModelConfig.from_dict(weight_reader.read_model_config(tmp_path / "init"))
    assert imported == dataclass_replace_free(cfg, imported)
    trained = _trained_in_process(imported, tmp_path / "init", tmp_path / "trained")
    export(str(trained), str(tmp_path / "hf"))
    err = _parity(trained, tmp_path / "hf")
    print(f"{family}: import ({kind}) -> 3 steps -> export -> transformers: max-abs logit error {err:.2e} (fp32)")
    assert err < MAX_ABS


def dataclass_replace_free(cfg: ModelConfig, like: ModelConfig) -> ModelConfig:
    """cfg with the fields an HF config.json does not carry (training-only extras) taken from ``like``."""
    import dataclasses

    free = init_from.INIT_FREE | {"aux_loss_alpha", "mtp_loss_weight"}
    return dataclasses.replace(cfg, **{k: getattr(like, k) for k in free if hasattr(like, k)})


def test_kimi_k2_through_train_py(tmp_path):
    """FP8 Kimi-K2-style directory -> import_hf.py -> python train.py (init_from, 3 steps, gradient
    accumulation given as deepspeed.gradient_accumulation_steps alone) -> export_hf.py -> transformers."""
    preset, experts, kind = FAMILIES["kimi_k2"]
    cfg = scaled_down(preset, *experts)
    _source(kind, cfg, tmp_path / "src", model_type="kimi_k2")
    import_hf(str(tmp_path / "src"), str(tmp_path / "init"))
    model = json.loads((tmp_path / "init" / weight_reader.INIT_CONFIG).read_text())["model"]
    assert from_hf_config(json.loads((tmp_path / "src" / "config.json").read_text())).n_group == 1
    run_cfg = tmp_path / "kimi_tiny.yaml"
    run_cfg.write_text(yaml.safe_dump({"model": model, "deepspeed": {"zero_optimization": {"stage": 1}}}))
    args = ["--config", str(run_cfg)] + run_args(tmp_path, make_corpus(tmp_path), "run", [
        "train.max_steps=3", "train.save_every=100", "train.micro_batch_size=2", f"train.init_from={tmp_path / 'init'}",
        "deepspeed.gradient_accumulation_steps=2"])[len(TINY_MODEL):]
    train(args)
    ckpt = checkpoint.complete_checkpoints(str(tmp_path / "run"))[-1]
    state = checkpoint.read_state(ckpt)
    assert state["config"]["train"]["grad_accum"] == 2       # taken from the deepspeed section
    export(str(ckpt), str(tmp_path / "hf"))
    err = _parity(ckpt, tmp_path / "hf")
    print(f"kimi_k2: import (fp8, model_type kimi_k2) -> train.py 3 steps -> export -> transformers: "
          f"max-abs logit error {err:.2e} (fp32)")
    assert err < MAX_ABS
