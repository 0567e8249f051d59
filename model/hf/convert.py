"""Mapping between this project's model and transformers' DeepSeek-V3 format.

On disk (``save_hf``) we write exactly what DeepSeek-V3's own checkpoints hold and what
``DeepseekV3ForCausalLM.from_pretrained`` reads: per-expert keys
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``, the router bias as
``mlp.gate.e_score_correction_bias``, and MTP depth k as the extra decoder layer
``model.layers.{L + k - 1}`` (enorm, hnorm, eh_proj, the block, shared_head.{norm,head},
embed_tokens). In memory our experts are stacked (E, in, out) for the grouped GEMM.

The files are written tensor by tensor (model/hf/export.py plans them from metadata, then streams
each shard) and read tensor by tensor (model/hf/read.py), DeepSeek's native FP8 format included
(model/hf/fp8_format.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from model.config import ModelConfig, rope_type
from model.hf import fp8_format
from model.hf.config_check import check_config_against_headers
from model.hf.export import (  # noqa: F401
    FP8,
    FP32_KEYS,
    INDEX_NAME,
    MTP_NAME,
    WEIGHTS_NAME,
    Entry,
    Meta,
    hf_entries,
    identity_entries,
    mtp_key_pattern,
    parse_size,
    plan_files,
    write_files,
)
from model.hf.read import (
    HFCheckpoint,
    check_planned_shapes,
    import_targets,
    read_target,
    read_weight_map,
    resolve_mtp,
    warn_no_mtp,
)
from model.hf.safe_header import read_header
from model.hf.safe_paths import inside, listed_files

if TYPE_CHECKING:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from model.transformer import DeepseekV3

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


def to_hf_config(cfg: ModelConfig) -> DeepseekV3Config:
    from transformers import DeepseekV3Config

    d = to_hf_config_dict(cfg)
    d.pop("model_type")
    d.pop("num_nextn_predict_layers")
    return DeepseekV3Config(num_mtp_layers=cfg.num_nextn_predict_layers, **d)


def from_hf_config(hf: dict[str, Any] | Any, where: str | None = None, **overrides: Any) -> ModelConfig:
    """A transformers config (object or config.json dict) -> ModelConfig. An invalid value is a
    ValueError naming ``where`` (the config.json file) and the field."""
    if where is None:
        return _from_hf_config(hf, **overrides)
    try:
        return _from_hf_config(hf, **overrides)
    except (ValueError, TypeError) as e:        # TypeError: a value of the wrong JSON type compared or added
        raise ValueError(f"{where}: {str(e).removeprefix('model.')}") from None


def _from_hf_config(hf: dict[str, Any] | Any, **overrides: Any) -> ModelConfig:
    d = hf if isinstance(hf, dict) else hf.to_dict()
    nullable = ("q_lora_rank", "pad_token_id")     # None means something for these: keep it
    kw = {k: d[k] for k in _HF_FIELDS if k in d and (d[k] is not None or k in nullable)}
    # MLA has no shared KV heads (k and v come per head out of kv_b_proj): ours is always
    # num_attention_heads, while transformers' DeepseekV3Config defaults the field to 128 whatever
    # the head count (its SDPA attention never reads it), so a transformers-saved config carries 128
    kw.pop("num_key_value_heads", None)
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

def _meta(sd: dict[str, torch.Tensor]) -> Meta:
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def to_hf_state_dict(model: DeepseekV3 | dict[str, torch.Tensor],
                     cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
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
    return {e.name: e.take(sd[e.source]) for e in hf_entries(_meta(sd), cfg)}


class _InMemory:
    """HFCheckpoint's reading interface over a dict of HF-named tensors."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = sd

    def names(self) -> list[str]:
        return list(self.sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.sd[name].dtype

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.sd[name]
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF keys (per-expert on disk, or transformers' fused in-memory experts) -> our keys: the
    import's plan (model/hf/read.py), applied to tensors already in memory."""
    src = _InMemory(hf)
    out = {}
    for name, t in import_targets(src, cfg).items():
        if t.kind in ("gate_up", "down"):                  # per-expert rows (1, ...) -> (E, ...)
            out[name] = torch.cat([read_target(src, t, None, e) for e in range(t.shape[0])])
        else:
            out[name] = read_target(src, t, None)
    return out


# ---------------------------------------------------------------- files

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16, "fp8": FP8}


def cast_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype`` (None: unchanged); the router bias stays fp32."""
    if dtype is None:
        return dict(sd)
    return {k: v.float() if k.endswith(FP32_KEYS) else v.to(dtype) if v.is_floating_point() else v
            for k, v in sd.items()}


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
    """Write HF-named tensors as ``model.safetensors``, or as shards plus
    ``model.safetensors.index.json`` when larger than ``max_shard_size``. Keys matching the regex
    ``separate`` go to ``mtp.safetensors``, which the index does not list. Stale weight files of an
    earlier export into ``path`` are removed first. Returns the file names written."""
    entries = identity_entries(sd)
    main = [e for e in entries if not (separate and re.search(separate, e.name))]
    side = [e for e in entries if separate and re.search(separate, e.name)]
    plan = plan_files(main, _NO_MTP, None, max_shard_size, "inline")
    if side:
        plan.files.insert(0, (MTP_NAME, plan_files(side, _NO_MTP, None, None, "inline").files[0][1]))
    return write_files(path, plan, sd.__getitem__)


class _NoMTP:   # plan_files' cfg for tensors that are already split: no MTP layer pattern
    num_nextn_predict_layers = 0
    num_hidden_layers = 0


_NO_MTP = _NoMTP()


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors directory, ``mtp.safetensors`` included (index names and
    headers checked as HFCheckpoint checks them)."""
    root = Path(path)
    if (root / INDEX_NAME).exists():
        files = sorted(set(read_weight_map(root).values()))
        if (root / MTP_NAME).exists():
            files.append(MTP_NAME)
    else:
        files = listed_files(root, ".safetensors", path)
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        f = inside(root, name, path, plain=True)
        read_header(f)
        sd.update(load_file(str(f)))
    return sd


def load_hf(path: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> DeepseekV3:
    """Load an HF DeepSeek-V3 directory into this project's model (eval mode).

    Reads bf16/fp32 and DeepSeek's native FP8 (dequantised tensor by tensor). A directory whose
    config.json promises MTP layers that are not in its weights (transformers never saves them)
    loads as a model without MTP, with one warning naming the missing tensors; some but not all
    of them is a ValueError."""
    from model.transformer import DeepseekV3

    ckpt = HFCheckpoint(path)                      # every header checked; index names stay inside path
    cfg = from_hf_config(ckpt.config, os.path.join(path, "config.json"), **overrides)
    check_config_against_headers(ckpt, cfg)        # layers, experts, widths: before any model is built
    missing = resolve_mtp(ckpt, cfg, path)
    if missing:
        warn_no_mtp(path, cfg, missing)
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    check_planned_shapes(import_targets(ckpt, cfg), cfg, path)   # every shape, on a meta model
    model = DeepseekV3(cfg)
    sd = from_hf_state_dict({k: ckpt.read(k, None if k.endswith(FP32_KEYS) else dtype) for k in ckpt.names()}, cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval() if dtype != torch.float32 else model.eval()


def write_hf_dir(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, path: str, dtype: torch.dtype | None = None,
                 max_shard_size: int | str | None = None, mtp: str = "auto") -> list[str]:
    """An HF directory from HF-named tensors: config.json, generation_config.json, weights."""
    return write_hf_entries(identity_entries(hf_sd), hf_sd.__getitem__, cfg, path, dtype, max_shard_size, mtp)


def write_hf_entries(entries: list[Entry], read: Callable[[str], torch.Tensor], cfg: ModelConfig, path: str,
                     dtype: torch.dtype | None = None, max_shard_size: int | str | None = None,
                     mtp: str = "auto") -> list[str]:
    """An HF directory from planned entries, ``read(source)`` giving one source tensor at a time.

    ``dtype`` None keeps each tensor's dtype; torch.float8_e4m3fn writes DeepSeek's FP8 format
    (model/hf/fp8_format.py: quantised weights + block scales, the rest bf16, config.json's
    quantization_config). The router bias stays fp32 whatever the dtype.

    ``mtp="auto"`` (default) satisfies both readers where it can: an unsharded export puts the MTP
    layers in ``mtp.safetensors`` next to ``model.safetensors`` (no index: transformers reads only
    model.safetensors and loads silently, serving engines read every *.safetensors and find the
    MTP draft); a sharded export must list them in the index for serving engines, so it is inline.

    ``mtp="inline"`` keeps the MTP layers in the index as DeepSeek-V3's checkpoints do (serving
    engines load them for speculative decoding; transformers 5.23 only silences the MTP keys of a
    61-layer model and lists the others as UNEXPECTED). ``"separate"`` writes them to
    ``mtp.safetensors`` outside the index (a silent transformers load; load_hf/import_hf still read
    them). ``"drop"`` leaves them out."""
    plan = plan_files(entries, cfg, dtype, max_shard_size, mtp)
    files = write_files(path, plan, read)
    cfg_dict = to_hf_config_dict(cfg)
    if plan.mtp_dropped:
        cfg_dict["num_nextn_predict_layers"] = 0
    main = next((o for _, outs in plan.files for o in outs if o.name == "model.embed_tokens.weight"), None)
    cfg_dict["dtype"] = str(main.dtype if main is not None else dtype or torch.float32).replace("torch.", "")
    if dtype is FP8:
        cfg_dict["quantization_config"] = dict(fp8_format.QUANT_CONFIG)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    return files


def save_hf(model: DeepseekV3, path: str, dtype: torch.dtype | None = None, max_shard_size: int | str | None = None,
            mtp: str = "auto") -> None:
    """Write an HF directory (config.json, generation_config.json, (sharded) safetensors)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    write_hf_entries(hf_entries(_meta(sd), model.config), sd.__getitem__, model.config, path, dtype,
                     max_shard_size, mtp)


def enable_transformers_mtp(hf_model: DeepseekV3ForCausalLM) -> None:
    """Let a transformers DeepseekV3ForCausalLM find this export's MTP layers, for
    ``generate(..., use_mtp=True)``: transformers 5.23 takes the MTP key patterns from
    ``_keys_to_ignore_on_load_unexpected``, which it hard-codes to layer 61 (DeepSeek-V3's own)."""
    cfg = hf_model.config
    L, D = cfg.num_hidden_layers, getattr(cfg, "num_nextn_predict_layers", 0) or 0
    patterns = set(hf_model._keys_to_ignore_on_load_unexpected or ())
    patterns = {p for p in patterns if not re.fullmatch(r"model\\\.layers\\\.\d+\.\*", p)}
    patterns.update(rf"model\.layers\.{L + k}\." for k in range(D))
    hf_model._keys_to_ignore_on_load_unexpected = patterns
