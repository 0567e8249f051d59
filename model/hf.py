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
    nullable = ("q_lora_rank", "pad_token_id")     # None means something for these: keep it
    kw = {k: d[k] for k in _HF_FIELDS if k in d and (d[k] is not None or k in nullable)}
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


def to_hf_state_dict(model, cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Our state dict -> HF/DeepSeek on-disk keys (per-expert, MTP as extra layers).

    ``model`` is a DeepseekV3, or a full (EP-gathered) state dict in our naming with ``cfg``:
    an export never needs to build the model."""
    if isinstance(model, dict):
        if cfg is None:
            raise ValueError("to_hf_state_dict(state_dict) needs the ModelConfig")
        sd = model
    else:
        cfg = model.config
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

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MTP_NAME = "mtp.safetensors"         # --mtp separate: MTP layers outside the index (see write_weights)
FP32_KEYS = ("e_score_correction_bias",)   # kept in fp32 whatever the export dtype
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """'2GB' / '500MB' / '10KiB' / 12345 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size={size!r}: expected a size like 2GB, 500MB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def cast_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype`` (None: unchanged); the router bias stays fp32."""
    if dtype is None:
        return dict(sd)
    return {k: v.float() if k.endswith(FP32_KEYS) else v.to(dtype) if v.is_floating_point() else v
            for k, v in sd.items()}


def mtp_key_pattern(cfg: ModelConfig) -> str | None:
    """Regex of the on-disk MTP keys (``model.layers.{L..L+D-1}.*``), None without MTP."""
    D, L = cfg.num_nextn_predict_layers, cfg.num_hidden_layers
    if not D:
        return None
    return r"^model\.layers\.(" + "|".join(str(L + k) for k in range(D)) + r")\."


def _own_storage(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied/copied weights): copy the repeats."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        if key in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()
        seen.add((v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()))
        out[k] = v
    return out


def write_weights(sd: dict[str, torch.Tensor], path: str, max_shard_size: int | str | None = None,
                  separate: str | None = None) -> list[str]:
    """Write ``sd`` as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when it is larger than ``max_shard_size``. Keys matching the
    regex ``separate`` go to ``mtp.safetensors``, which the index does not list. Stale weight files
    of an earlier export into ``path`` are removed first. Returns the file names written."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name == INDEX_NAME or name == MTP_NAME or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name):
            os.remove(os.path.join(path, name))
    sd = _own_storage(sd)
    written = []
    if separate:
        side = {k: v for k, v in sd.items() if re.search(separate, k)}
        sd = {k: v for k, v in sd.items() if k not in side}
        if side:
            save_file(side, os.path.join(path, MTP_NAME), metadata={"format": "pt"})
            written.append(MTP_NAME)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if limit is not None and shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        return written + [WEIGHTS_NAME]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        written.append(name)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return written


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors directory, ``mtp.safetensors`` included."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        if os.path.exists(os.path.join(path, MTP_NAME)):
            files.append(MTP_NAME)
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


def write_hf_dir(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, path: str, dtype: torch.dtype | None = None,
                 max_shard_size: int | str | None = None, mtp: str = "auto") -> list[str]:
    """An HF directory from HF-named tensors: config.json, generation_config.json, weights.

    ``mtp="auto"`` (default) satisfies both readers where it can: an unsharded export puts the MTP
    layers in ``mtp.safetensors`` next to ``model.safetensors`` (no index: transformers reads only
    model.safetensors and loads silently, serving engines read every *.safetensors and find the
    MTP draft); a sharded export must list them in the index for serving engines, so it is inline.

    ``mtp="inline"`` keeps the MTP layers in the index as DeepSeek-V3's checkpoints do (serving
    engines load them for speculative decoding; transformers 5.23 only silences the MTP keys of a
    61-layer model and lists the others as UNEXPECTED). ``"separate"`` writes them to
    ``mtp.safetensors`` outside the index (a silent transformers load; load_hf/import_hf still read
    them). ``"drop"`` leaves them out."""
    if mtp not in ("auto", "inline", "separate", "drop"):
        raise ValueError(f"mtp={mtp!r}: must be auto, inline, separate or drop")
    pattern = mtp_key_pattern(cfg)
    if mtp == "auto":
        main_bytes = sum(v.numel() * (dtype.itemsize if dtype is not None and v.is_floating_point() else
                                      v.element_size())
                         for k, v in hf_sd.items() if not (pattern and re.search(pattern, k)))
        fits = max_shard_size is None or main_bytes <= parse_size(max_shard_size)
        mtp = "separate" if fits else "inline"
    cfg_dict = to_hf_config_dict(cfg)
    if mtp == "drop" and pattern:
        hf_sd = {k: v for k, v in hf_sd.items() if not re.search(pattern, k)}
        cfg_dict["num_nextn_predict_layers"] = 0
    hf_sd = cast_state_dict(hf_sd, dtype)
    files = write_weights(hf_sd, path, max_shard_size, separate=pattern if mtp == "separate" else None)
    main = hf_sd.get("model.embed_tokens.weight")
    cfg_dict["dtype"] = str(main.dtype if main is not None else dtype or torch.float32).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    return files


def save_hf(model, path: str, dtype: torch.dtype | None = None, max_shard_size: int | str | None = None,
            mtp: str = "auto") -> None:
    """Write an HF directory (config.json, generation_config.json, (sharded) safetensors)."""
    write_hf_dir(to_hf_state_dict(model), model.config, path, dtype, max_shard_size, mtp)


def enable_transformers_mtp(hf_model) -> None:
    """Let a transformers DeepseekV3ForCausalLM find this export's MTP layers, for
    ``generate(..., use_mtp=True)``: transformers 5.23 takes the MTP key patterns from
    ``_keys_to_ignore_on_load_unexpected``, which it hard-codes to layer 61 (DeepSeek-V3's own)."""
    cfg = hf_model.config
    L, D = cfg.num_hidden_layers, getattr(cfg, "num_nextn_predict_layers", 0) or 0
    patterns = set(hf_model._keys_to_ignore_on_load_unexpected or ())
    patterns = {p for p in patterns if not re.fullmatch(r"model\\\.layers\\\.\d+\.\*", p)}
    patterns.update(rf"model\.layers\.{L + k}\." for k in range(D))
    hf_model._keys_to_ignore_on_load_unexpected = patterns
