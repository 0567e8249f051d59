"""Model configuration: a typed mirror of transformers' ``DeepseekV3Config``.

Field names follow the HF config (so a YAML ``model:`` section reads like a ``config.json``);
the few training-only extras (loss weights, implementation switches) are marked below.
``validate()`` raises a ``ValueError`` naming the field and its value for every invalid
combination, before any weight is allocated.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense-layer FFN width
    moe_intermediate_size: int = 2048       # width of each routed (and each shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA: always equal to the number of heads
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536          # None: plain q_proj (DeepSeek-V2-Lite style)
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN etc. as in DeepSeek's config.json, e.g. {"type": "yarn", "factor": 40,
    # "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
    # "mscale": 1.0, "mscale_all_dim": 1.0}
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0       # MTP depth D
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # ---- training extras (not in the HF config) ----
    aux_loss_alpha: float = 0.0001          # sequence-wise balance loss weight
    mtp_loss_weight: float = 0.3            # lambda: total MTP loss = lambda / D * sum_k L_k
    moe_impl: str = "grouped"               # "grouped" (grouped GEMM) | "loop" (reference oracle)
    attn_impl: str = "auto"                 # "auto" | "sdpa" | "flash" | "eager" (reference)
    loss_impl: str = "chunked"              # "chunked" (head GEMM fused with the loss) | "full" (reference)
    loss_chunk: int = 1024                  # tokens per chunk of the chunked loss

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    # ---- derived sizes ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's correction)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if rope_type(rs) != "default":
            mscale_all_dim = rs.get("mscale_all_dim", 0) or 0
            factor = rs.get("factor", 1.0)
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "model") -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{where}.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("intermediate_size", "moe_intermediate_size", "n_shared_experts",
                     "n_routed_experts", "qk_nope_head_dim", "first_k_dense_replace",
                     "num_nextn_predict_layers", "n_group", "topk_group", "num_experts_per_tok"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "must be a non-negative integer")
        # floats the math divides by, takes the log or the power of: finite and positive (a NaN passes
        # every comparison below, so finiteness first); also for values read from an HF config.json
        for name, low in (("rms_norm_eps", "positive"), ("rope_theta", "positive"), ("routed_scaling_factor",
                          "positive"), ("initializer_range", "non-negative"), ("aux_loss_alpha", "non-negative"),
                          ("mtp_loss_weight", "non-negative"), ("attention_dropout", "non-negative")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (v == 0 and low == "positive"):
                raise bad(name, f"must be a finite {low} number")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise bad("q_lora_rank", "must be a positive integer or null (plain q_proj)")
        if self.num_key_value_heads != self.num_attention_heads:
            raise bad("num_key_value_heads", f"MLA needs it equal to num_attention_heads "
                      f"({self.num_attention_heads})")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"exceeds num_hidden_layers ({self.num_hidden_layers})")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise bad("intermediate_size", "dense layers need a positive FFN width")
        has_moe = self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0
        if has_moe:
            if self.n_routed_experts <= 0:
                raise bad("n_routed_experts", "MoE layers need at least one routed expert")
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "must be positive")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise bad("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group < 1:
                raise bad("n_group", "must be >= 1")
            if self.n_routed_experts % self.n_group:
                raise bad("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible by it")
            per_group = self.n_routed_experts // self.n_group
            if per_group < 2:
                raise bad("n_group", "each group needs >= 2 experts (group score = sum of its top-2)")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"must be in [1, n_group={self.n_group}]")
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise bad("num_experts_per_tok", f"more than the {self.topk_group * per_group} experts "
                          f"in topk_group={self.topk_group} groups of {per_group}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.moe_impl not in ("grouped", "loop"):
            raise bad("moe_impl", "must be 'grouped' or 'loop'")
        if self.attn_impl not in ("auto", "sdpa", "flash", "eager"):
            raise bad("attn_impl", "must be one of auto, sdpa, flash, eager")
        if self.loss_impl not in ("chunked", "full"):
            raise bad("loss_impl", "must be 'chunked' or 'full'")
        if self.loss_chunk < 1:
            raise bad("loss_chunk", "must be >= 1 token")
        if self.routed_scaling_factor <= 0:
            raise bad("routed_scaling_factor", "must be positive")
        if self.aux_loss_alpha < 0:
            raise bad("aux_loss_alpha", "must be >= 0")
        if self.mtp_loss_weight < 0:
            raise bad("mtp_loss_weight", "must be >= 0")
        if not 0 <= self.attention_dropout < 1:
            raise bad("attention_dropout", "must be in [0, 1)")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                raise bad("rope_scaling", "must be a mapping or null")
            kind = rope_type(rs)
            if kind not in ("default", "yarn"):
                raise bad("rope_scaling", f"type {kind!r} is not supported (default, yarn)")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in rs:
                        raise bad("rope_scaling", f"yarn needs {key!r}")
                for key, v in rs.items():    # every YaRN number enters a log, a power or a ratio
                    if key not in ("type", "rope_type", "truncate") and v is not None and (
                            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                        raise bad("rope_scaling", f"{key}={v!r} is not a finite number")
                if rs["factor"] < 1:
                    raise bad("rope_scaling", "yarn factor must be >= 1")


def rope_type(rope_scaling: dict[str, Any] | None) -> str:
    rs = rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))


__all__ = ["ModelConfig", "rope_type"]
