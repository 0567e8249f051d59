# ruff: noqa: ANN001  (arguments of @triton.jit kernels stay unannotated: Triton reads annotations as types)
"""FP8 grouped GEMMs for routed experts, in Triton, with DeepSeek-V3's fine-grained scales.

Learned from DeepGEMM's m-grouped and k-grouped GEMMs (written here from scratch): one launch
covers every expert, whatever their number, and the host never reads the group sizes.

  m_grouped  out (N, n) = a (N, k) @ b[e] (k, n) for the rows of each expert e.
             a: fp8, one scale per row per 128 columns (1x128 tiles); b: fp8, one scale per
             128x128 block. Forward (x @ w[e]) and dgrad (dy @ w[e]^T, b read through strides).
  k_grouped  out[e] (k, n) = a[rows of e]^T @ b[rows of e]: contracts over each expert's tokens,
             both operands with one scale per 128 tokens per column (128x1 tiles that restart at
             every expert's first row). wgrad: dw[e] = x_e^T @ dy_e.

Every 128-wide step of the contraction is one fp8 tensor-core dot whose fp32 result is multiplied
by the two operands' scales and added to an fp32 accumulator (DeepSeek's "promotion to FP32 every
128 elements of K"). Needs fp8e4nv dots: sm89 (Ada) and sm90 (Hopper).

Quantisation stays in torch (model/fp8.py): Triton 3.9's interpreter rounds fp32 -> fp8 conversions
wrongly (triton issue 8322), so a kernel that quantised would not be testable on CPU. These kernels
only load fp8 and upcast it (exact) inside the dot.

Group layout without host syncs: ``tile_plan`` maps every possible m-tile to (expert, first row,
end row) on the device; the grid is sized by the upper bound N // BLOCK_M + E, known on the host
from shapes alone, and tiles past the last one return at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SCALE_BLOCK = 128      # contraction step = scale granularity (1x128, 128x128, 128x1)


@dataclass
class TilePlan:
    """Every m-tile a launch may run: (T,) int32 tensors on the device, T = N // block_m + E."""
    expert: torch.Tensor     # the tile's expert, -1 past the last real tile
    row0: torch.Tensor       # its first row
    row_end: torch.Tensor    # one past the last row of its expert (rows are masked beyond)
    block_m: int


def tile_plan(counts: torch.Tensor, n_rows: int, block_m: int) -> TilePlan:
    """counts (E,) rows per expert -> TilePlan; about ten small ops, the same for any E."""
    E = counts.shape[0]
    counts = counts.long()
    end = counts.cumsum(0)
    tiles = (counts + block_m - 1) // block_m
    tiles_end = tiles.cumsum(0)
    t = torch.arange(n_rows // block_m + E, device=counts.device)          # every tile that may exist
    e = torch.searchsorted(tiles_end, t, right=True)                        # (T,) in [0, E]
    ec = e.clamp(max=E - 1)
    row0 = (end - counts)[ec] + (t - (tiles_end - tiles)[ec]) * block_m
    real = e < E
    return TilePlan(torch.where(real, e, -1).int(), row0.int(), torch.where(real, end[ec], row0).int(), block_m)


@triton.jit
def _m_grouped_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, expert_ptr, row0_ptr, row_end_ptr,
                      K, N, stride_am, stride_sam, stride_be, stride_bk, stride_bn,
                      stride_sbe, stride_sbk, stride_sbn, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows of tile, cols] = sum over 128-blocks kb of (a_kb @ b[e]_kb) * sa[row, kb] * sb[e, kb, col // 128]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:                                                   # past the last tile: nothing to do
        return
    row0 = tl.load(row0_ptr + pid_m)
    row_end = tl.load(row_end_ptr + pid_m)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    b_base = b_ptr + e.to(tl.int64) * stride_be
    sb_base = sb_ptr + e.to(tl.int64) * stride_sbe + (pid_n * BLOCK_N // 128) * stride_sbn   # BLOCK_N divides 128
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        sa = tl.load(sa_ptr + rows * stride_sam + kb, mask=row_ok, other=0.0)         # (BLOCK_M,)
        sb = tl.load(sb_base + kb * stride_sbk)                                         # one 128x128 block
        acc += tl.dot(a, b) * (sa[:, None] * sb)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _k_grouped_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, start_ptr, end_ptr, tile_first_ptr,
                      K, N, stride_am, stride_sat, stride_bm, stride_sbt, stride_oe, stride_ok,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[e, ks, cols] = sum over expert e's 128-token tiles t of (a_t^T @ b_t) * sa[t, ks] * sb[t, cols]."""
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(start_ptr + e)
    end = tl.load(end_ptr + e)
    t0 = tl.load(tile_first_ptr + e)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    col_ok = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for s in range(0, tl.cdiv(end - start, BLOCK_T)):            # an empty expert: no step, zeros stored
        toks = (start + s * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        tok_ok = toks < end
        at = tl.load(a_ptr + toks[None, :] * stride_am + ks[:, None], mask=k_ok[:, None] & tok_ok[None, :],
                     other=0.0)                                                         # (BLOCK_K, BLOCK_T) = a^T
        b = tl.load(b_ptr + toks[:, None] * stride_bm + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :],
                    other=0.0)                                                          # (BLOCK_T, BLOCK_N)
        tile = (t0 + s).to(tl.int64)
        sa = tl.load(sa_ptr + tile * stride_sat + ks, mask=k_ok, other=0.0)
        sb = tl.load(sb_ptr + tile * stride_sbt + cols, mask=col_ok, other=0.0)
        acc += tl.dot(at, b) * (sa[:, None] * sb[None, :])
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + ks[:, None] * stride_ok + cols[None, :], acc,
             mask=k_ok[:, None] & col_ok[None, :])


# launch shapes: (BLOCK_M, BLOCK_N, warps, stages) for m-grouped, (BLOCK_K, BLOCK_N, warps, stages) for
# k-grouped. fp8 tiles of 64x128 + 128x128 bytes per stage fit Ada's 100 KB of shared memory 3 deep.
M_GROUPED_BLOCKS = (64, 128, 4, 3)
K_GROUPED_BLOCKS = (64, 128, 4, 3)


def m_grouped_fp8(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  plan: TilePlan, transpose_b: bool = False, block_n: int | None = None) -> torch.Tensor:
    """a (N, k) fp8 + a_scale (N, ceil(k/128)); b (E, k, n) fp8 + b_scale (E, ceil(k/128), ceil(n/128)), or
    with ``transpose_b`` b (E, n, k) + b_scale (E, ceil(n/128), ceil(k/128)) read as its transpose
    -> fp32 (N, n): rows of expert e times b[e]. ``plan`` from ``tile_plan(counts, N, block_m)``."""
    bm, bn, warps, stages = M_GROUPED_BLOCKS
    bn = block_n or bn
    if plan.block_m > 128 or 128 % bn:
        raise ValueError(f"m_grouped_fp8: block_n={bn} must divide 128")
    N, k = a.shape
    n = b.shape[1] if transpose_b else b.shape[2]
    # (E, k, n) strides of the logical b, and of its block scales
    sbe, sbk, sbn = (b.stride(0), b.stride(2), b.stride(1)) if transpose_b else b.stride()
    ste, stk, stn = ((b_scale.stride(0), b_scale.stride(2), b_scale.stride(1)) if transpose_b
                     else b_scale.stride())
    out = torch.empty(N, n, dtype=torch.float32, device=a.device)
    if N == 0 or n == 0:
        return out
    grid = (plan.expert.shape[0], triton.cdiv(n, bn))
    _m_grouped_kernel[grid](a, a_scale, b, b_scale, out, plan.expert, plan.row0, plan.row_end,
                            k, n, a.stride(0), a_scale.stride(0), sbe, sbk, sbn, ste, stk, stn, out.stride(0),
                            BLOCK_M=plan.block_m, BLOCK_N=bn, BLOCK_K=SCALE_BLOCK, num_warps=warps, num_stages=stages)
    return out


def k_grouped_fp8(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  start: torch.Tensor, end: torch.Tensor, tile_first: torch.Tensor,
                  block_k: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """a (N, k) fp8, b (N, n) fp8, each with a scale per 128-token tile per column ((T, k), (T, n)), tiles
    numbered from ``tile_first[e]`` for expert e (model.fp8.segments) -> fp32 (E, k, n) = a_e^T @ b_e."""
    bk, bn, warps, stages = K_GROUPED_BLOCKS
    bk, bn = block_k or bk, block_n or bn
    E = start.shape[0]
    k, n = a.shape[1], b.shape[1]
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("k_grouped_fp8: rows of a and b must be contiguous")
    out = torch.empty(E, k, n, dtype=torch.float32, device=a.device)
    if E == 0 or k == 0 or n == 0:
        return out
    grid = (E, triton.cdiv(k, bk), triton.cdiv(n, bn))
    _k_grouped_kernel[grid](a, a_scale, b, b_scale, out, start, end, tile_first,
                            k, n, a.stride(0), a_scale.stride(0), b.stride(0), b_scale.stride(0),
                            out.stride(0), out.stride(1),
                            BLOCK_K=bk, BLOCK_N=bn, BLOCK_T=SCALE_BLOCK, num_warps=warps, num_stages=stages)
    return out
