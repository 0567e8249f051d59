# ruff: noqa: ANN001  (arguments of @triton.jit kernels stay unannotated: Triton reads annotations as types)
"""Fused FP8 quantize kernels in Triton: one launch per quantization (plus its output allocations).

The same results, bit for bit, as the torch quantizers of model/fp8.py, which stay the oracle:
  quantize_act       (M, K) -> 1x128 tiles along K                         = fp8.quantize_act
  quantize_wgrad     (M, K) -> 128x1 tiles along rows                      = fp8.quantize_wgrad
  retile_wgrad       a cached 1x128 QTensor -> 128x1, dequantize fused     = fp8.retile_wgrad
  quantize_segments  (N, K) sorted by expert -> 128x1 tiles that restart at every expert's first row
                     (``Segments``), optionally from a cached 1x128 input  = fp8.quantize_segments
  quantize_dual      both 1x128 and 128x1 tiles of an output gradient from one read = fp8.quantize_dual
  quantize_weight    (N, K) -> 128x128 blocks                              = fp8.quantize_weight
  quantize_experts   (E, K, M) -> 128x128 blocks of every expert           = fp8.quantize_experts
Same scale rule (amax per tile over the zero-padded tile, clamped to AMAX_EPS, divided by 448, or
rounded up to a power of two), same division, same clamp, same layout of data and scales (the
scale grid covers the padded shape; no rows still give one row of floor scales, as torch's
quantizers do; unused segment tile slots keep the floor scale).

Why the E4M3 bits are encoded by hand: Triton 3.9's interpreter rounds fp32 -> fp8 conversions
wrongly (triton issue 8322), so a kernel that wrote ``x.to(tl.float8e4nv)`` could not be checked
on a CPU. ``_e4m3_bits`` instead builds the byte with integer arithmetic, the algorithm torch's own
conversion uses (c10 ``fp8e4m3fn_from_fp32_value``): round to nearest even on the fp32 bits for
normal numbers, the fp32 adder's rounding against 2^14 for subnormals (below 2^-6); values were
clamped to +-448 just before, so nothing saturates. The byte is stored through a uint8 view of the
fp8 output pointer. The same code runs on a GPU, where it costs a few integer ops per element.

Bit-identity also needs the division to be IEEE round-to-nearest, which Triton's ``/`` on fp32 does not
promise on a GPU (``tl.math.fdiv`` documents approximate modes), so every division here is
``tl.math.div_rn``. No add follows a multiply (the dequantize of a cached input is a plain product), so
no FMA contraction changes a bit.
Not bit-identical: non-finite inputs (NaN or inf in a tile): both sides give NaN codes, not
necessarily the same ones (Triton's max ignores NaN where torch's amax propagates it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.fp8 import ACT_TILE, AMAX_EPS, FP8_DTYPE, FP8_MAX, WEIGHT_TILE, WGRAD_TILE, QTensor, Segments

TILE = 128             # the 128 of 1x128 and 128x1
_EPS = tl.constexpr(AMAX_EPS)
_MAX = tl.constexpr(FP8_MAX)
ROWS_PER_PROGRAM = 32  # quantize_act: rows of one program (x one 128-wide tile of K)
COLS_PER_PROGRAM = 64  # the 128x1 kernels: columns of one program (x one 128-row tile)


@triton.jit
def _scale_of(amax, POW2: tl.constexpr):
    """Dequant scale of a tile: max(amax, eps) / 448 (IEEE division), or rounded up to 2^k with the
    fp32 bits (add all-ones to the mantissa, keep the exponent): model.fp8.compute_scale."""
    s = tl.math.div_rn(tl.maximum(amax, _EPS), _MAX)
    if POW2:
        s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _e4m3_bits(q):
    """fp32 already clamped to [-448, 448] -> its E4M3 byte (uint8), rounded to nearest even."""
    bits = q.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # normal (|q| >= 2^-6): drop 20 mantissa bits with round to nearest even; rebias 127 -> 7
    odd = (mag >> 20) & 1
    normal = (mag + (((7 - 127) << 23) + 0x7FFFF) + odd) >> 20
    # subnormal: adding 2^14 leaves the value's multiple of 2^-9 (E4M3's subnormal step) in the low bits
    sub = (tl.abs(q) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    code = tl.where(mag < (121 << 23), sub, normal)
    code = tl.where(mag > 0x7F800000, 0x7F, code)                  # NaN
    return (code | tl.where(bits < 0, 0x80, 0)).to(tl.uint8)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, n_scale_rows, stride_xm, stride_sm,
                       BLOCK_M: tl.constexpr, POW2: tl.constexpr):
    """1x128 tiles: program (i, j) quantizes rows [i*BLOCK_M, +BLOCK_M) x columns [j*128, +128)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    kt = tl.program_id(1)
    cols = kt * 128 + tl.arange(0, 128)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.abs(x), axis=1), POW2)                                    # (BLOCK_M,)
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -_MAX, _MAX)
    tl.store(q_ptr.to(tl.pointer_type(tl.uint8)) + rows[:, None] * K + cols[None, :], _e4m3_bits(q), mask=ok)
    tl.store(s_ptr + rows * stride_sm + kt, scale, mask=rows < n_scale_rows)


@triton.jit
def _quant_cols_tile(x_ptr, xs_ptr, q_ptr, s_ptr, row0, row_end, tile, cols, K, KS, stride_xm, stride_xsm,
                     stride_st, IN_FP8: tl.constexpr, POW2: tl.constexpr):
    """One 128-row tile (rows [row0, min(row0 + 128, row_end))) x cols: quantized with one scale per column."""
    rows = (row0 + tl.arange(0, 128)).to(tl.int64)
    col_ok = cols < K
    ok = (rows < row_end)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if IN_FP8:   # a cached 1x128 input: dequantize (fp8 * its tile's scale), the product torch forms
        x = x * tl.load(xs_ptr + rows[:, None] * stride_xsm + (cols // 128)[None, :], mask=ok, other=0.0)
    scale = _scale_of(tl.max(tl.abs(x), axis=0), POW2)                                    # (BLOCK_K,)
    q = tl.clamp(tl.math.div_rn(x, scale[None, :]), -_MAX, _MAX)
    tl.store(q_ptr.to(tl.pointer_type(tl.uint8)) + rows[:, None] * K + cols[None, :], _e4m3_bits(q), mask=ok)
    tl.store(s_ptr + tile.to(tl.int64) * stride_st + cols, scale, mask=cols < KS)     # KS: K, or 1 if K = 0


@triton.jit
def _quant_cols_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, start_ptr, end_ptr, tile_first_ptr,
                       M, K, KS, E, n_tiles, stride_xm, stride_xsm, stride_st,
                       BLOCK_K: tl.constexpr, SEGMENTED: tl.constexpr, IN_FP8: tl.constexpr, POW2: tl.constexpr):
    """128x1 tiles. Dense: program (t, j) is row tile t. Segmented: program (e, j) walks expert e's tiles
    (they restart at its first row), and program (E, j) gives the unused tile slots the floor scale."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if SEGMENTED:
        if pid < E:
            start = tl.load(start_ptr + pid)
            end = tl.load(end_ptr + pid)
            t0 = tl.load(tile_first_ptr + pid)
            for s in range(0, tl.cdiv(end - start, 128)):
                _quant_cols_tile(x_ptr, xs_ptr, q_ptr, s_ptr, start + s * 128, end, t0 + s, cols, K, KS,
                                 stride_xm, stride_xsm, stride_st, IN_FP8, POW2)
        else:
            # E >= 1 here (no experts means no tile slots: nothing is launched)
            last_start = tl.load(start_ptr + E - 1)
            used = tl.load(tile_first_ptr + E - 1) + tl.cdiv(tl.load(end_ptr + E - 1) - last_start, 128)
            floor = _scale_of(tl.zeros((BLOCK_K,), dtype=tl.float32), POW2)
            for t in range(used.to(tl.int32), n_tiles):
                tl.store(s_ptr + t * stride_st + cols, floor, mask=cols < KS)
    else:
        _quant_cols_tile(x_ptr, xs_ptr, q_ptr, s_ptr, pid * 128, M, pid, cols, K, KS, stride_xm, stride_xsm,
                         stride_st, IN_FP8, POW2)


@triton.jit
def _quant_both_kernel(x_ptr, qa_ptr, sa_ptr, qw_ptr, sw_ptr, M, K, n_act_scale_rows, KS, stride_xm, stride_sam,
                       stride_swt, POW2: tl.constexpr):
    """1x128 and 128x1 tiles of the same x from one read: program (i, j) holds the 128x128 block whose row
    maxima are its rows' 1x128 scales and whose column maxima are its columns' 128x1 scales."""
    rows = (tl.program_id(0) * 128 + tl.arange(0, 128)).to(tl.int64)
    kt = tl.program_id(1)
    cols = kt * 128 + tl.arange(0, 128)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    s_row = _scale_of(tl.max(ax, axis=1), POW2)                                           # (128,) 1x128
    s_col = _scale_of(tl.max(ax, axis=0), POW2)                                           # (128,) 128x1
    qa = tl.clamp(tl.math.div_rn(x, s_row[:, None]), -_MAX, _MAX)
    qw = tl.clamp(tl.math.div_rn(x, s_col[None, :]), -_MAX, _MAX)
    offs = rows[:, None] * K + cols[None, :]
    tl.store(qa_ptr.to(tl.pointer_type(tl.uint8)) + offs, _e4m3_bits(qa), mask=ok)
    tl.store(qw_ptr.to(tl.pointer_type(tl.uint8)) + offs, _e4m3_bits(qw), mask=ok)
    tl.store(sa_ptr + rows * stride_sam + kt, s_row, mask=rows < n_act_scale_rows)
    tl.store(sw_ptr + tl.program_id(0).to(tl.int64) * stride_swt + cols, s_col, mask=cols < KS)


@triton.jit
def _quant_blocks_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_xb, stride_xr, stride_sb, stride_sr,
                         POW2: tl.constexpr):
    """128x128 blocks of matrix b of a batch: program (i, j, b) quantizes block (i, j) with one scale."""
    b = tl.program_id(2).to(tl.int64)
    rows = (tl.program_id(0) * 128 + tl.arange(0, 128)).to(tl.int64)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    ok = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + b * stride_xb + rows[:, None] * stride_xr + cols[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)
    scale = _scale_of(tl.max(tl.max(tl.abs(x), axis=1), axis=0), POW2)
    q = tl.clamp(tl.math.div_rn(x, scale), -_MAX, _MAX)
    tl.store(q_ptr.to(tl.pointer_type(tl.uint8)) + b * R * C + rows[:, None] * C + cols[None, :], _e4m3_bits(q),
             mask=ok)
    tl.store(s_ptr + b * stride_sb + tl.program_id(0) * stride_sr + tl.program_id(1), scale)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def quantize_act(x: torch.Tensor, pow2: bool = False) -> QTensor:
    """(M, K) any float dtype -> 1x128 tiles: data (M, K) fp8, scale (max(M, 1), ceil(K/128)), one launch."""
    x = _rows_contiguous(x)
    M, K = x.shape
    Kt = max(-(-K // TILE), 1)
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(max(M, 1), Kt, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(max(M, 1), ROWS_PER_PROGRAM), Kt)
    _quant_rows_kernel[grid](x, q, scale, M, K, max(M, 1), x.stride(0), scale.stride(0),
                             BLOCK_M=ROWS_PER_PROGRAM, POW2=pow2)
    return QTensor(q, scale, ACT_TILE, (M, K))


def _quant_cols(x: torch.Tensor, x_scale: torch.Tensor | None, seg: Segments | None, pow2: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The 128x1 launch: x (M, K) (fp8 with its 1x128 x_scale, or any float) -> data (M, K), scale (T, K)."""
    M, K = x.shape
    n_tiles = seg.n_tiles if seg is not None else -(-max(M, 1) // TILE)
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    # a dense scale grid covers the padded shape as torch's does: one column even when K = 0
    scale = torch.empty(n_tiles, K if seg is not None else max(K, 1), dtype=torch.float32, device=x.device)
    if scale.numel() == 0:
        return q, scale
    E = seg.start.shape[0] if seg is not None else 0
    grid = (E + 1 if seg is not None else n_tiles, triton.cdiv(scale.shape[1], COLS_PER_PROGRAM))
    ptrs = (seg.start, seg.end, seg.tile_first) if seg is not None else (scale, scale, scale)   # unused if dense
    xs = x_scale if x_scale is not None else scale
    _quant_cols_kernel[grid](x, xs, q, scale, *ptrs, M, K, scale.shape[1], E, n_tiles, x.stride(0), xs.stride(0),
                             scale.stride(0), BLOCK_K=COLS_PER_PROGRAM, SEGMENTED=seg is not None,
                             IN_FP8=x_scale is not None, POW2=pow2)
    return q, scale


def quantize_wgrad(x: torch.Tensor, pow2: bool = False) -> QTensor:
    """(M, K) -> 128x1 tiles along rows: data (M, K) fp8, scale (ceil(max(M, 1)/128), K), one launch."""
    x = _rows_contiguous(x)
    q, scale = _quant_cols(x, None, None, pow2)
    return QTensor(q, scale, WGRAD_TILE, tuple(x.shape))


def retile_wgrad(q: QTensor, pow2: bool = False) -> QTensor:
    """A cached 1x128 QTensor -> 128x1 tiles, dequantize and re-quantize in one launch."""
    if q.tile != ACT_TILE:
        raise ValueError(f"retile_wgrad expects 1x128 tiles, got {q.tile}")
    data, scale = _quant_cols(_rows_contiguous(q.data), q.scale, None, pow2)
    return QTensor(data, scale, WGRAD_TILE, q.shape)


def quantize_segments(x: torch.Tensor | QTensor, seg: Segments, pow2: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, K) sorted by expert, high precision or a cached 1x128 QTensor -> data (N, K) fp8,
    scale (seg.n_tiles, K): 128x1 tiles restarting at every expert's first row, one launch."""
    if isinstance(x, QTensor):
        if x.tile != ACT_TILE:
            raise ValueError(f"quantize_segments expects 1x128 tiles, got {x.tile}")
        return _quant_cols(_rows_contiguous(x.data), x.scale, seg, pow2)
    return _quant_cols(_rows_contiguous(x), None, seg, pow2)


def quantize_dual(x: torch.Tensor, pow2: bool = False) -> tuple[QTensor, QTensor]:
    """(M, K) -> (quantize_act(x), quantize_wgrad(x)) from one read of x, one launch (an output gradient
    feeds both the dgrad, 1x128, and the wgrad, 128x1)."""
    x = _rows_contiguous(x)
    M, K = x.shape
    Mt, Kt = -(-max(M, 1) // TILE), max(-(-K // TILE), 1)
    qa = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    qw = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    sa = torch.empty(max(M, 1), Kt, dtype=torch.float32, device=x.device)
    sw = torch.empty(Mt, max(K, 1), dtype=torch.float32, device=x.device)
    _quant_both_kernel[(Mt, Kt)](x, qa, sa, qw, sw, M, K, max(M, 1), max(K, 1), x.stride(0), sa.stride(0),
                                 sw.stride(0), POW2=pow2, num_warps=8)
    return QTensor(qa, sa, ACT_TILE, (M, K)), QTensor(qw, sw, WGRAD_TILE, (M, K))


def quantize_weight(w: torch.Tensor, pow2: bool = False) -> QTensor:
    """(N, K) weight -> 128x128 blocks, one launch = fp8.quantize_weight."""
    w = _rows_contiguous(w.detach())
    N, K = w.shape
    Nt, Kt = -(-max(N, 1) // TILE), -(-max(K, 1) // TILE)
    q = torch.empty(N, K, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(Nt, Kt, dtype=torch.float32, device=w.device)
    _quant_blocks_kernel[(Nt, Kt, 1)](w, q, scale, N, K, 0, w.stride(0), 0, scale.stride(0), POW2=pow2,
                                      num_warps=8)
    return QTensor(q, scale, WEIGHT_TILE, (N, K))


def quantize_experts(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts' weights (E, K, M) -> data (E, K, M) fp8, scale (E, Kt, Mt), one launch
    = fp8.quantize_experts."""
    w = w.detach()
    if w.stride(2) != 1 or w.stride(1) != w.shape[2] or w.stride(0) != w.shape[1] * w.shape[2]:
        w = w.contiguous()
    E, K, M = w.shape
    Kt, Mt = -(-max(K, 1) // TILE), -(-max(M, 1) // TILE)
    q = torch.empty(E, K, M, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(E, Kt, Mt, dtype=torch.float32, device=w.device)
    if E:
        _quant_blocks_kernel[(Kt, Mt, E)](w, q, scale, K, M, w.stride(0), w.stride(1), scale.stride(0),
                                          scale.stride(1), POW2=pow2, num_warps=8)
    return q, scale
