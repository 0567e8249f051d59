"""Mapping between this project's model and transformers' DeepSeek-V3 format.

On disk (``save_hf``) we write exactly what DeepSeek-V3's own checkpoints hold and what
``DeepseekV3ForCausalLM.from_pretrained`` reads: per-expert keys
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``, the router bias as
``mlp.gate.e_score_correction_bias``, and MTP depth k as the extra decoder layer
``model.layers.{L + k - 1}`` (enorm, hnorm, eh_proj, the block, shared_head.{norm,head},
embed_tokens). In memory our experts are stacked (E, in, out) for the grouped GEMM.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, rope_type

_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
    "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
    "v_head_dim", "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
    "norm_topk_prob", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_interleave", "attention_bias", "attention_dropout", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)


# ---------------------------------------------------------------- config

def to_hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    d = {k: getattr(cfg, k) for k in _HF_FIELDS}
    rope: dict[str, Any] = {"rope_type": rope_type(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    for k, v in (cfg.rope_scaling or {}).items():
        if k not in ("type", "rope_type"):
            rope[k] = v
    d["rope_parameters"] = rope
    d["num_nextn_predict_layers"] = cfg.num_nextn_predict_layers
    d["model_type"] = "deepseek_v3"
    d["architectures"] = ["DeepseekV3ForCausalLM"]
    return d


def to_hf_config(cfg: ModelConfig):
    from transformers import DeepseekV3Config

    d = to_hf_config_dict(cfg)
    d.pop("model_type")
    d.pop("num_nextn_predict_layers")
    return DeepseekV3Config(num_mtp_layers=cfg.num_nextn_predict_layers, **d)


def from_hf_config(hf: dict[str, Any] | Any, **overrides: Any) -> ModelConfig:
    """A transformers config (object or config.json dict) -> ModelConfig."""
    d = hf if isinstance(hf, dict) else hf.to_dict()
    kw = {k: d[k] for k in _HF_FIELDS if k in d and d[k] is not None or k in ("q_lora_rank", "pad_token_id") and k in d}
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    kw["rope_theta"] = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    kw["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    kw["num_nextn_predict_layers"] = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- state dict

def _block_to_hf(prefix_in: str, sd: dict[str, torch.Tensor], out_prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Copy one decoder block's tensors, unstacking the experts into per-expert keys."""
    for key, t in sd.items():
        if not key.startswith(prefix_in):
            continue
        rest = key[len(prefix_in):]
        if rest == "mlp.experts.w_gate_up":                                  # (E, D, 2F)
            F_ = t.shape[2] // 2
            for e in range(t.shape[0]):
                out[f"{out_prefix}mlp.experts.{e}.gate_proj.weight"] = t[e, :, :F_].t().contiguous()
                out[f"{out_prefix}mlp.experts.{e}.up_proj.weight"] = t[e, :, F_:].t().contiguous()
        elif rest == "mlp.experts.w_down":                                   # (E, F, D)
            for e in range(t.shape[0]):
                out[f"{out_prefix}mlp.experts.{e}.down_proj.weight"] = t[e].t().contiguous()
        else:
            out[out_prefix + rest] = t


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our state dict -> HF/DeepSeek on-disk keys (per-expert, MTP as extra layers)."""
    cfg: ModelConfig = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": sd["embed_tokens.weight"],
        "model.norm.weight": sd["norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    L = cfg.num_hidden_layers
    for i in range(L):
        _block_to_hf(f"layers.{i}.", sd, f"model.layers.{i}.", out)
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{L + k}."
        for name in ("enorm", "hnorm", "eh_proj"):
            out[p + name + ".weight"] = sd[f"mtp.{k}.{name}.weight"]
        _block_to_hf(f"mtp.{k}.block.", sd, p, out)
        out[p + "shared_head.norm.weight"] = sd[f"mtp.{k}.norm.weight"]
        # DeepSeek's layout repeats the shared embedding and head inside each MTP layer
        out[p + "shared_head.head.weight"] = sd["lm_head.weight"]
        out[p + "embed_tokens.weight"] = sd["embed_tokens.weight"]
    return out


_EXPERT_KEY = re.compile(r"(.*)mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF keys (per-expert on disk, or transformers' fused in-memory experts) -> our keys."""
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}

    def ours(key: str) -> str | None:
        if key == "lm_head.weight":
            return key
        if not key.startswith("model."):
            return None
        key = key[len("model."):]
        m = re.match(r"layers\.(\d+)\.(.*)", key)
        if not m:
            return key                                       # embed_tokens, norm
        i, rest = int(m.group(1)), m.group(2)
        if i < L:
            return f"layers.{i}.{rest}"
        k = i - L
        if k >= cfg.num_nextn_predict_layers:
            return None
        if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            return f"mtp.{k}.{rest}"
        if rest == "shared_head.norm.weight":
            return f"mtp.{k}.norm.weight"
        if rest in ("shared_head.head.weight", "embed_tokens.weight"):
            return None                                      # copies of the shared weights
        return f"mtp.{k}.block.{rest}"

    for key, t in hf.items():
        m = _EXPERT_KEY.match(key)
        if m:
            base = ours(m.group(1) + "mlp.experts.w")
            if base is not None:
                experts.setdefault(base[:-1], {}).setdefault(m.group(3), {})[int(m.group(2))] = t
            continue
        name = ours(key)
        if name is None:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):       # fused (E, 2F, D)
            out[name.replace("gate_up_proj", "w_gate_up")] = t.transpose(1, 2).contiguous()
        elif name.endswith("mlp.experts.down_proj"):        # fused (E, D, F)
            out[name.replace("down_proj", "w_down")] = t.transpose(1, 2).contiguous()
        else:
            out[name] = t
    for base, parts in experts.items():
        E = cfg.n_routed_experts
        missing = [f"{p}[{e}]" for p in ("gate_proj", "up_proj", "down_proj") for e in range(E) if e not in parts.get(p, {})]
        if missing:
            raise ValueError(f"HF checkpoint lacks expert weights under {base}: {missing[:4]}...")
        gate = torch.stack([parts["gate_proj"][e].t() for e in range(E)])   # (E, D, F)
        up = torch.stack([parts["up_proj"][e].t() for e in range(E)])
        out[base + "w_gate_up"] = torch.cat([gate, up], dim=2).contiguous()  # (E, D, 2F)
        out[base + "w_down"] = torch.stack([parts["down_proj"][e].t() for e in range(E)]).contiguous()
    if cfg.tie_word_embeddings:
        out.setdefault("lm_head.weight", out["embed_tokens.weight"])
    return out


# ---------------------------------------------------------------- files

def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd.update(load_file(os.path.join(path, name)))
    return sd


def load_hf(path: str, dtype: torch.dtype = torch.float32, **overrides: Any):
    """Load an HF DeepSeek-V3 directory into this project's model (eval mode)."""
    from model.transformer import DeepseekV3

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: not a Hugging Face model directory")
    with open(cfg_path) as f:
        cfg = from_hf_config(json.load(f), **overrides)
    model = DeepseekV3(cfg)
    sd = from_hf_state_dict(read_safetensors_dir(path), cfg)
    sd = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v
          for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval() if dtype != torch.float32 else model.eval()


def save_hf(model, path: str, dtype: torch.dtype | None = None) -> None:
    """Write an HF directory (config.json, generation_config.json, model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    sd = to_hf_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v
              for k, v in sd.items()}
    # safetensors refuses shared storage: give every tensor its own copy
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    cfg_dict = to_hf_config_dict(model.config)
    cfg_dict["torch_dtype"] = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
