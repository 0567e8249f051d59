"""Rotary position embedding with optional YaRN scaling, as DeepSeek-V3 uses it.

Only the ``qk_rope_head_dim`` slice of each head is rotated. DeepSeek's checkpoints lay the
rotary dims out as interleaved pairs (x0, x1), (x2, x3), ... (``rope_interleave=True``); each
pair i is rotated by angle pos * inv_freq[i]. We return the rotated pairs de-interleaved
([all evens | all odds]), exactly as transformers does: q and k get the same permutation, so
q.k is unchanged and the layouts stay bit-compatible with the HF oracle.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ModelConfig, rope_type


def yarn_inv_freq(dim: int, base: float, rs: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): blend interpolated and extrapolated frequencies per dim.

    Returns (inv_freq (dim/2,), attention_factor) where attention_factor multiplies cos/sin.
    """
    factor = float(rs["factor"])
    orig_max = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # the dim index whose wavelength completes num_rotations turns over orig_max positions
        return dim * math.log(orig_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep_extrapolated = 1 - ramp  # high-frequency dims keep their original frequency
    inv_freq = interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.qk_rope_head_dim
        if rope_type(cfg.rope_scaling) == "yarn":
            inv_freq, self.attention_factor = yarn_inv_freq(dim, cfg.rope_theta, cfg.rope_scaling)
        else:
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_factor = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    @torch.no_grad()
    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (S, dim/2) in ``dtype`` (angles computed in fp32); with per-token
        ``positions`` (B, S) (positions restarting at each packed document) (B, 1, S, dim/2),
        which broadcasts over the heads in apply_rope."""
        if positions is None:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))                 # (S, dim/2)
        else:
            freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(device)  # (B, S, dim/2)
            freqs = freqs.unsqueeze(1)                                         # (B, 1, S, dim/2)
        cos = (freqs.cos() * self.attention_factor).to(dtype)
        sin = (freqs.sin() * self.attention_factor).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x: (B, H, S, dr); cos/sin: (S, dr/2) or (B, 1, S, dr/2). Returns the rotated x, same shape."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]        # pair i = (x[2i], x[2i+1])
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]      # pair i = (x[i], x[i + dr/2])
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
