"""DeepSeek-V3's released FP8 weight format, on disk: read (dequantise) and write (quantise), CPU only.

The format (DeepSeek-V3 README_WEIGHTS.md, "FP8 Weight Documentation"): a quantised weight W (out, in)
is stored as ``float8_e4m3fn`` plus ``<name>_scale_inv``, float32 of shape (ceil(out/128), ceil(in/128)),
one dequantisation scale per 128x128 block; W ~= fp8.float() * scale_inv block by block, the partial
blocks at the right and bottom edges included. DeepSeek computes a block's scale as amax(block) / 448
(inference/kernel.py ``weight_quant``; 448 is e4m3's largest finite value) and declares the format in
config.json as QUANT_CONFIG below.

Which tensors are quantised is taken from the released DeepSeek-V3 checkpoint's safetensors headers:
every 2-D linear weight of attention (q_a/q_b/kv_a_proj_with_mqa/kv_b/o_proj), of the dense MLPs, the
shared experts and the routed experts, in the main layers and the MTP layer alike, is F8_E4M3 with a
``weight_scale_inv``; these stay BF16: ``model.embed_tokens``, ``lm_head``, every RMSNorm
(input/post_attention/q_a/kv_a layernorms, ``model.norm``, MTP ``enorm``/``hnorm``/``shared_head.norm``),
the MTP layer's ``eh_proj``, ``shared_head.head`` and ``embed_tokens``, and the router
(``mlp.gate.weight``); ``mlp.gate.e_score_correction_bias`` is F32. DeepSeek's own
inference/bf16_cast_fp8.py skips the same names. KEEP_HIGH_PRECISION encodes that list.
"""
from __future__ import annotations

import math
import re

import torch

from model.fp8 import FP8_DTYPE, quantize_weight

BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [BLOCK, BLOCK]}
KEEP_HIGH_PRECISION = (
    r"(^|\.)embed_tokens\.weight$", r"^lm_head\.weight$", r"\.shared_head\.head\.weight$",
    r"\.eh_proj\.weight$", r"norm\.weight$", r"\.mlp\.gate\.weight$", r"e_score_correction_bias$",
)
_KEEP = re.compile("|".join(KEEP_HIGH_PRECISION))


def is_quantised(name: str, shape: tuple[int, ...]) -> bool:
    """Whether DeepSeek's release stores this HF tensor as FP8 (a 2-D .weight not on the keep list)."""
    return len(shape) == 2 and name.endswith(".weight") and not _KEEP.search(name)


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    out, inp = shape
    return math.ceil(out / BLOCK), math.ceil(inp / BLOCK)


def check_quant_config(qc: object, where: str) -> None:
    """config.json's quantization_config must describe DeepSeek's FP8 block format: another method,
    fmt or block size would be dequantised wrongly. (``activation_scheme`` is not checked: it says
    how a serving engine quantises activations and does not change what the stored weights mean.)"""
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config={qc!r}: expected a mapping")
    block = qc.get("weight_block_size")
    checks = (("quant_method", qc.get("quant_method"), "fp8"),
              ("fmt", qc.get("fmt", "e4m3"), "e4m3"),            # absent: the tensors' own dtype decides
              ("weight_block_size", list(block) if isinstance(block, (list, tuple)) else block, [BLOCK, BLOCK]))
    for key, got, want in checks:
        if got != want:
            raise ValueError(f"{where}: quantization_config.{key}={got!r}: only DeepSeek's FP8 format "
                             f"({key}={want!r}) can be read")


def quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (float8_e4m3fn (out, in), float32 scale_inv (ceil(out/128), ceil(in/128))),
    scale = amax(block) / 448 as DeepSeek computes it (an all-zero block gets a tiny positive scale
    instead of DeepSeek's 0/0, so every stored scale is finite)."""
    q = quantize_weight(w)
    return q.data, q.scale


def dequantise(name: str, weight: torch.Tensor, scale_inv: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 weight * its block scales -> ``dtype``, one row of blocks at a time (so the only
    temporary is one 128-row strip in fp32, not a full-size scale grid). ValueError naming the
    tensor for a scale of the wrong dtype, block shape or with a non-finite / negative entry."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D float8_e4m3fn weight, got {weight.dtype} {tuple(weight.shape)}")
    want = scale_shape(tuple(weight.shape))
    sname = scale_name(name)
    if scale_inv.dtype != torch.float32:
        raise ValueError(f"{sname}: scale must be float32, got {scale_inv.dtype}")
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{sname}: shape {tuple(scale_inv.shape)}, expected {want} (128x128 blocks of "
                         f"{name} {tuple(weight.shape)})")
    if not torch.isfinite(scale_inv).all():
        bad = (~torch.isfinite(scale_inv)).nonzero()[0].tolist()
        raise ValueError(f"{sname}: non-finite scale {scale_inv[tuple(bad)].item()} at block {tuple(bad)}")
    if (scale_inv < 0).any():
        bad = (scale_inv < 0).nonzero()[0].tolist()
        raise ValueError(f"{sname}: negative scale {scale_inv[tuple(bad)].item()} at block {tuple(bad)}")
    out_rows, in_cols = weight.shape
    out = torch.empty(out_rows, in_cols, dtype=dtype)
    for i in range(want[0]):
        rows = slice(i * BLOCK, min((i + 1) * BLOCK, out_rows))
        col_scale = scale_inv[i].repeat_interleave(BLOCK)[:in_cols]          # (in,)
        out[rows] = (weight[rows].float() * col_scale).to(dtype)
    return out
