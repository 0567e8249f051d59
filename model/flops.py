"""Parameter counts and training FLOPs per token, computed from the config alone
(no weights are allocated, so the 671B preset can be summarised on a laptop).

Conventions: "activated" counts the parameters one token's forward pass multiplies with:
all attention and dense weights, the router, the shared experts and K of the routed experts.
The input embedding is a lookup, not a matmul: it is counted in the totals and reported
separately, and excluded from FLOPs. Training FLOPs = 3 x forward (forward + 2 x backward).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from model.config import ModelConfig


@dataclass
class ParamCounts:
    total: int                 # main model, embedding and head included
    activated: int             # per token, main model, embedding included
    activated_no_embedding: int
    embedding: int
    lm_head: int
    mtp_total: int             # MTP modules, excluding the shared embedding/head
    mtp_activated: int
    flops_per_token_train: float          # main model, 6N + attention, at seq_len
    flops_per_token_train_with_mtp: float
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


def _attention(c: ModelConfig) -> int:
    D, H = c.hidden_size, c.num_attention_heads
    dq = c.qk_head_dim
    b = 1 if c.attention_bias else 0
    if c.q_lora_rank is None:
        q = D * H * dq
    else:
        q = D * c.q_lora_rank + b * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * dq
    kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + b * (c.kv_lora_rank + c.qk_rope_head_dim)
    kv += c.kv_lora_rank + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
    o = H * c.v_head_dim * D + b * D
    return q + kv + o


def _ffn(c: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, activated) parameters of one layer's feed-forward part."""
    D = c.hidden_size
    if not moe:
        n = 3 * D * c.intermediate_size
        return n, n
    expert = 3 * D * c.moe_intermediate_size
    shared = c.n_shared_experts * expert
    router = c.n_routed_experts * D
    return (router + shared + c.n_routed_experts * expert,
            router + shared + c.num_experts_per_tok * expert)


def _block(c: ModelConfig, moe: bool) -> tuple[int, int]:
    attn = _attention(c)
    ffn_total, ffn_active = _ffn(c, moe)
    norms = 2 * c.hidden_size
    return attn + ffn_total + norms, attn + ffn_active + norms


def _attention_flops(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of QK^T and AV in one layer, causal (average context ~ S/2)."""
    H = c.num_attention_heads
    fwd = 2 * H * (c.qk_head_dim + c.v_head_dim) * (seq_len + 1) / 2
    return 3 * fwd


def count_params(c: ModelConfig, seq_len: int = 4096) -> ParamCounts:
    D, V = c.hidden_size, c.vocab_size
    embedding = V * D
    lm_head = 0 if c.tie_word_embeddings else V * D
    total = active = embedding + lm_head + D                      # + final norm
    for i in range(c.num_hidden_layers):
        t, a = _block(c, c.is_moe_layer(i))
        total += t
        active += a
    mtp_t = mtp_a = 0
    for _ in range(c.num_nextn_predict_layers):
        t, a = _block(c, c.n_routed_experts > 0)
        extra = 3 * D + 2 * D * D                                 # enorm, hnorm, own final norm; eh_proj
        mtp_t += t + extra
        mtp_a += a + extra
    matmul_active = active - embedding                            # lookups are not matmuls
    attn = _attention_flops(c, seq_len)
    flops = 6 * matmul_active + c.num_hidden_layers * attn
    # an MTP depth also runs the shared head over every position
    flops_mtp = flops + c.num_nextn_predict_layers * (6 * (mtp_a + V * D) + attn)
    return ParamCounts(total=total, activated=active, activated_no_embedding=matmul_active,
                       embedding=embedding, lm_head=lm_head, mtp_total=mtp_t, mtp_activated=mtp_a,
                       flops_per_token_train=float(flops), flops_per_token_train_with_mtp=float(flops_mtp),
                       seq_len=seq_len)
