"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Shapes: B batch, S sequence, D model dim, H heads, dn = qk_nope_head_dim,
dr = qk_rope_head_dim, dv = v_head_dim, dq = dn + dr, r_kv = kv_lora_rank, r_q = q_lora_rank.

Queries go through a low-rank bottleneck (D -> r_q -> H*dq) or a plain projection when
q_lora_rank is null. Keys/values are compressed into one latent c_kv (r_kv) plus a single
decoupled RoPE key k_r (dr) shared by all heads; that latent is what an inference cache keeps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.norm import RMSNorm
from model.rope import apply_rope

try:  # optional CUDA extra
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference attention: explicit scores, mask and fp32 softmax. (B,H,S,*) -> (B,H,S,dv).
    ``mask`` (B, 1, S, S) bool, True where allowed; None: causal."""
    S = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                    # (B, H, S, S)
    if mask is None:
        mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """flash-attn needs equal head dims for q/k and v: pad v from dv to dq, slice the output."""
    dv, dq = v.shape[-1], q.shape[-1]
    if dv < dq:
        v = F.pad(v, (0, dq - dv))
    # flash-attn layout is (B, S, H, d)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=scale, causal=True)
    return out[..., :dv].transpose(1, 2)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   dropout_p: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA, causal. On CPU its fused (flash) kernel needs equal q/k and v head dims, else it
    falls back to the unfused math path (explicit S x S scores and softmax): pad v from dv to dq
    there, as for flash-attn; the padded columns come out zero and are sliced off. ``mask``
    (B, 1, S, S) bool replaces the causal mask (packed documents, model/documents.py)."""
    dv, dq = v.shape[-1], q.shape[-1]
    pad = q.device.type == "cpu" and dv < dq
    if pad:
        v = F.pad(v, (0, dq - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         dropout_p=dropout_p)
    return out[..., :dv] if pad else out


def pick_backend(requested: str, q: torch.Tensor) -> str:
    flash_ok = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if requested == "flash" and not flash_ok:
        why = ("flash-attn is not installed" if flash_attn_func is None else
               f"the tensors are {q.dtype} on {q.device.type}, it needs fp16/bf16 on CUDA")
        raise ValueError(f"model.attn_impl='flash': {why}; use 'auto' (flash-attn where it can run, "
                         "else torch SDPA) or 'sdpa'")
    if requested != "auto":
        return requested
    return "flash" if flash_ok else "sdpa"


def _refuse_flash_with_mask() -> str:
    raise ValueError("model.attn_impl='flash' cannot mask packed documents (data.document_mask=true); "
                     "use 'auto' or 'sdpa'")


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.dq = self.dn + self.dr
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        D, H, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=bias)
        self.scale = cfg.softmax_scale()
        self.interleave = cfg.rope_interleave
        self.backend = cfg.attn_impl
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D). ``mask`` (B, 1, S, S) bool: attention inside packed documents
        (model/documents.py); None: plain causal attention."""
        B, S, _ = x.shape
        H = self.n_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, H, self.dq).transpose(1, 2)                            # (B, H, S, dq)
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)

        kv_a = self.kv_a_proj_with_mqa(x)                                        # (B, S, r_kv + dr)
        c_kv, k_rope = kv_a.split([self.kv_lora_rank, self.dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv))                           # (B, S, H*(dn+dv))
        kv = kv.view(B, S, H, self.dn + self.dv).transpose(1, 2)                 # (B, H, S, dn+dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)

        cos, sin = rope
        q_rope = apply_rope(q_rope, cos, sin, self.interleave)
        k_rope = apply_rope(k_rope.view(B, 1, S, self.dr), cos, sin, self.interleave)  # shared by heads
        q = torch.cat([q_nope, q_rope], dim=-1)                                  # (B, H, S, dq)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, self.dr)], dim=-1)         # (B, H, S, dq)

        backend = pick_backend(self.backend, q)
        if backend == "flash" and mask is not None:
            # flash_attn_func takes no mask; its varlen form would, but SDPA with the mask is enough here
            backend = "sdpa" if self.backend == "auto" else _refuse_flash_with_mask()
        if backend == "flash":
            out = flash_attention(q, k, v, self.scale, self.dropout if self.training else 0.0)
        elif backend == "eager":
            out = eager_attention(q, k, v, self.scale, mask)
        else:
            out = sdpa_attention(q, k, v, self.scale, self.dropout if self.training else 0.0, mask)
        out = out.transpose(1, 2).reshape(B, S, H * self.dv)                    # (B, S, H*dv)
        return self.o_proj(out)
