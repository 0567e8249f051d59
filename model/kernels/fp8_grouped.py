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

These kernels only load fp8 and upcast it (exact) inside the dot; the quantizations feeding them are
model/kernels/fp8_quant.py (one launch each, bit-identical to model/fp8.py, E4M3 bytes encoded with
integer arithmetic because Triton 3.9's interpreter rounds fp32 -> fp8 conversions wrongly, triton
issue 8322). ``dense_fp8_mm`` / ``dense_fp8_wgrad`` are the same kernels with one group (DENSE): the
three GEMMs of a plain FP8 linear on sm89, where torch has no blockwise scaled_mm.

Group layout without host syncs: ``tile_plan`` maps every possible m-tile to its expert on the device
(the kernel derives the tile's rows from the expert's count and end); the grid is sized by the upper
bound N // BLOCK_M + E, known on the host from shapes alone, and tiles past the last one return at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SCALE_BLOCK = 128      # contraction step = scale granularity (1x128, 128x128, 128x1)


@dataclass
class TilePlan:
    """Every m-tile a launch may run, on the device: T = N // block_m + E tile slots."""
    expert: torch.Tensor     # (T,) int64 the slot's expert; E past the last real tile
    counts: torch.Tensor     # (E,) int64 rows per expert
    end: torch.Tensor        # (E,) int64 one past each expert's last row
    tiles_end: torch.Tensor  # (E,) int64 one past each expert's last tile slot
    block_m: int


def tile_plan(counts: torch.Tensor, n_rows: int, block_m: int) -> TilePlan:
    """counts (E,) rows per expert -> TilePlan; six small ops, the same for any E (the kernel derives
    each tile's first row from its expert: rows restart at every expert, tiles never span two)."""
    E = counts.shape[0]
    counts = counts.long()
    tiles_end = ((counts + block_m - 1) // block_m).cumsum(0)
    t = torch.arange(n_rows // block_m + E, device=counts.device)          # every tile that may exist
    expert = torch.searchsorted(tiles_end, t, right=True)                   # (T,) in [0, E]
    return TilePlan(expert, counts, counts.cumsum(0), tiles_end, block_m)


@triton.jit
def _m_grouped_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, expert_ptr, counts_ptr, end_ptr, tiles_end_ptr,
                      K, N, n_rows, E, stride_am, stride_sam, stride_be, stride_bk, stride_bn,
                      stride_sbe, stride_sbk, stride_sbn, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DENSE: tl.constexpr):
    """out[rows of tile, cols] = sum over 128-blocks kb of (a_kb @ b[e]_kb) * sa[row, kb] * sb[e, kb, col // 128].
    DENSE: one group of n_rows rows (a plain FP8 linear), no tile plan."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if DENSE:
        row0 = pid_m * BLOCK_M
        row_end = n_rows
        b_base = b_ptr
        sb_base = sb_ptr + (pid_n * BLOCK_N // 128) * stride_sbn
    else:
        e = tl.load(expert_ptr + pid_m)
        if e >= E:                                              # past the last tile: nothing to do
            return
        count = tl.load(counts_ptr + e)
        row_end = tl.load(end_ptr + e)
        tiles_e = (count + BLOCK_M - 1) // BLOCK_M
        row0 = row_end - count + (pid_m - (tl.load(tiles_end_ptr + e) - tiles_e)) * BLOCK_M
        b_base = b_ptr + e.to(tl.int64) * stride_be
        sb_base = sb_ptr + e.to(tl.int64) * stride_sbe + (pid_n * BLOCK_N // 128) * stride_sbn   # BLOCK_N | 128
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
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
                      K, N, n_rows, stride_am, stride_sat, stride_bm, stride_sbt, stride_oe, stride_ok,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, DENSE: tl.constexpr):
    """out[e, ks, cols] = sum over expert e's 128-token tiles t of (a_t^T @ b_t) * sa[t, ks] * sb[t, cols].
    DENSE: one segment, rows [0, n_rows) (the wgrad of a plain FP8 linear)."""
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    if DENSE:
        start = n_rows * 0                                      # tensors, as the loaded values are
        end = n_rows
        t0 = n_rows * 0
    else:
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
    _m_grouped_kernel[grid](a, a_scale, b, b_scale, out, plan.expert, plan.counts, plan.end, plan.tiles_end,
                            k, n, N, plan.counts.shape[0], a.stride(0), a_scale.stride(0), sbe, sbk, sbn, ste, stk, stn,
                            out.stride(0),
                            BLOCK_M=plan.block_m, BLOCK_N=bn, BLOCK_K=SCALE_BLOCK, DENSE=False, num_warps=warps,
                            num_stages=stages)
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
                            k, n, a.shape[0], a.stride(0), a_scale.stride(0), b.stride(0), b_scale.stride(0),
                            out.stride(0), out.stride(1),
                            BLOCK_K=bk, BLOCK_N=bn, BLOCK_T=SCALE_BLOCK, DENSE=False, num_warps=warps,
                            num_stages=stages)
    return out


def dense_fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 transpose_b: bool = False) -> torch.Tensor:
    """The m-grouped kernel with one group: a (M, k) fp8 + a_scale (M, ceil(k/128)) 1x128 tiles, b (n, k) fp8
    + b_scale (ceil(n/128), ceil(k/128)) 128x128 blocks (any strides) -> fp32 (M, n) = a @ b^T; with
    ``transpose_b`` b is (k, n) (the weight as stored, read transposed for the dgrad: no view is made).
    No tile plan: tiles are rows [i * BLOCK_M, +BLOCK_M) of a."""
    bm, bn, warps, stages = M_GROUPED_BLOCKS
    M, k = a.shape
    # b[e] (k, n) of the grouped kernel is b^T: element (kk, nn) at b[nn, kk] (at b[kk, nn] with transpose_b)
    n = b.shape[1] if transpose_b else b.shape[0]
    sbk, sbn = b.stride() if transpose_b else (b.stride(1), b.stride(0))
    stk, stn = b_scale.stride() if transpose_b else (b_scale.stride(1), b_scale.stride(0))
    if a.stride(1) != 1 and k > 1:
        raise ValueError("dense_fp8_mm: rows of a must be contiguous")
    out = torch.empty(M, n, dtype=torch.float32, device=a.device)
    if M == 0 or n == 0:
        return out
    grid = (triton.cdiv(M, bm), triton.cdiv(n, bn))
    # one group: the expert strides are 0 and the plan pointers unused
    _m_grouped_kernel[grid](a, a_scale, b, b_scale, out, a_scale, a_scale, a_scale, a_scale,
                            k, n, M, 1, a.stride(0), a_scale.stride(0), 0, sbk, sbn, 0, stk, stn, out.stride(0),
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=SCALE_BLOCK, DENSE=True, num_warps=warps,
                            num_stages=stages)
    return out


def dense_fp8_wgrad(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """The k-grouped kernel with one segment: a (M, k), b (M, n) fp8, each with 128x1 tiles ((T, k), (T, n)
    scales) -> fp32 (k, n) = a^T @ b, contracted over the M rows."""
    bk, bn, warps, stages = K_GROUPED_BLOCKS
    M, k = a.shape
    n = b.shape[1]
    if (a.stride(1) != 1 and k > 1) or (b.stride(1) != 1 and n > 1):
        raise ValueError("dense_fp8_wgrad: rows of a and b must be contiguous")
    out = torch.empty(k, n, dtype=torch.float32, device=a.device)
    if k == 0 or n == 0:
        return out
    grid = (1, triton.cdiv(k, bk), triton.cdiv(n, bn))
    _k_grouped_kernel[grid](a, a_scale, b, b_scale, out, a_scale, a_scale, a_scale,
                            k, n, M, a.stride(0), a_scale.stride(0), b.stride(0), b_scale.stride(0),
                            0, out.stride(0),
                            BLOCK_K=bk, BLOCK_N=bn, BLOCK_T=SCALE_BLOCK, DENSE=True, num_warps=warps,
                            num_stages=stages)
    return out
