"""FP8 linear and FP8 grouped expert GEMM (DeepSeek-V3 recipe) as autograd functions.

Every GEMM here is "NT": out (M, N) = a (M, K) @ b (N, K)^T, accumulated in fp32, with a
quantized in 1x128 tiles along K and b in 128x128 blocks (weights) or 1x128 tiles (activations).
The three GEMMs of a linear y = x W^T (x (M,K), W (N,K)):
  forward  y  (M,N) = x_q[1x128]          @ W_q[128x128]^T
  dgrad    dx (M,K) = dy_q[1x128]         @ (W_q^T)[128x128]^T
  wgrad    dW (N,K) = (dy_q[128x1])^T     @ (x_q[128x1])^T^T     (contracts over tokens M)
Only FP8 tensors + scales are saved for backward (``cache_fp8``); x is re-tiled 1x128 -> 128x1 in
backward. Master weights and weight gradients stay in the weight's dtype (fp32).

Kernels of the linear (chosen by model/fp8_probe.py):
  emulated   dequantize exactly, fp32 matmul. Runs anywhere; the test oracle.
  triton     the Triton FP8 GEMMs of the experts with one group (model/kernels/fp8_grouped.py: m-grouped for
             forward and dgrad, k-grouped for wgrad) and the fused quantizers of model/kernels/fp8_quant.py:
             one launch per GEMM and per quantization. sm89 (Ada), where torch has no blockwise scaled_mm.
  rowwise    torch._scaled_mm with row-wise scales, one call per 128-wide K chunk, partial sums
             added in fp32 -- the tile recipe expressed with row-wise scaling (also what DeepSeek
             means by "promote to FP32 every 128 elements of K"). Works on CPU and pre-blockwise GPUs.
  blockwise  torch.nn.functional.scaled_mm with BlockWise1x128 / BlockWise128x128 (Hopper, CUDA 12.9+).
Grouped expert GEMMs (``fp8_grouped_mm``): all experts' weights quantized in one pass (and reused
across micro-steps), then forward, dgrad and wgrad each ONE grouped GEMM, counts never read on the host:
  emulated   one torch._grouped_mm over the dequantized operands per GEMM (the CPU path).
  triton     model/kernels/fp8_grouped.py: m-grouped (forward, dgrad) and k-grouped (wgrad), sm89/sm90,
             fed by the fused quantizers of model/kernels/fp8_quant.py (one launch each).
``fp8_grouped_reference`` is the slow per-expert loop both are tested against.
Which kernel runs where: model/fp8_probe.py.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from model.fp8 import (
    ACT_TILE,
    WEIGHT_TILE,
    QTensor,
    Segments,
    dequantize_act_padded,
    dequantize_experts,
    dequantize_segments,
    quantize,
    quantize_act,
    quantize_experts,
    quantize_weight,
    quantize_wgrad,
    retile_wgrad,
    segments,
)
from model.grouped_gemm import _loop_mm, _loop_wgrad, _native_ok
from model.moe import RoutedExperts

log = logging.getLogger(__name__)
KERNELS = ("emulated", "rowwise", "blockwise", "triton")


# ----------------------------------------------------------------------------- GEMM kernels

# scaled_mm output dtype per kernel: fp32 where the device supports it, else bf16 (set by the probe;
# the rowwise kernel still adds its per-chunk partials in fp32)
_OUT_DTYPE = {"rowwise": torch.float32, "blockwise": torch.float32}


def _pad_rows(t: torch.Tensor, mult: int) -> torch.Tensor:
    """Zero-pad dim 0 of a 2-D (fp8 or fp32) tensor to a multiple of ``mult``."""
    n = t.shape[0]
    if n % mult == 0:
        return t
    out = torch.zeros((-(-n // mult) * mult,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:n] = t
    return out


def _col(v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A fresh contiguous (rows, 1) or (1, cols) scale: _scaled_mm checks strides, even of size-1 dims."""
    out = torch.empty(shape, dtype=torch.float32, device=v.device)
    out.copy_(v.reshape(shape))
    return out


def _b_scale_per_row(b: QTensor) -> torch.Tensor:
    """b's scale expanded to one value per (row of b, K chunk): (Np, Kp/128)."""
    return b.scale.repeat_interleave(b.tile[0], 0) if b.tile[0] > 1 else b.scale


def _mm_emulated(a: QTensor, b: QTensor) -> torch.Tensor:
    return a.dequantize() @ b.dequantize().t()


def _mm_rowwise(a: QTensor, b: QTensor) -> torch.Tensor:
    M, N = a.shape[0], b.shape[0]
    ad = a.padded_data(16)                                                   # (Mp, Kp) row-major
    bd = b.padded_data(16 if b.tile[0] == 1 else None)                       # (Np, Kp); .t() is column-major
    sa = _pad_rows(a.scale, 16)                                              # (Mp, Kt)
    sb = _pad_rows(_b_scale_per_row(b), 16)[: bd.shape[0]]                   # (Np, Kt)
    out = torch.zeros(ad.shape[0], bd.shape[0], dtype=torch.float32, device=ad.device)
    for j in range(ad.shape[1] // 128):
        k = slice(j * 128, (j + 1) * 128)
        out += torch._scaled_mm(ad[:, k], bd[:, k].t(), scale_a=_col(sa[:, j], (ad.shape[0], 1)),
                                scale_b=_col(sb[:, j], (1, bd.shape[0])), out_dtype=_OUT_DTYPE["rowwise"])
    return out[:M, :N]


def _mm_blockwise(a: QTensor, b: QTensor) -> torch.Tensor:
    """Scale layouts follow torch's own scaled_mm samples: outer-dim-major (transposed) scales,
    the 128x128 one padded to a multiple of 4 K-blocks."""
    SM, ST = F.ScalingType, F.SwizzleType
    M, N = a.shape[0], b.shape[0]
    ad = a.padded_data(16)
    bd = b.padded_data(16 if b.tile[0] == 1 else None)
    sa = _pad_rows(a.scale.float(), 16).t().contiguous().t()                 # (Mp, Kt), stride (1, Mp)
    if b.tile == WEIGHT_TILE:
        kt = b.scale.shape[1]
        l4 = -(-kt // 4) * 4
        sb = torch.ones(b.scale.shape[0], l4, device=b.scale.device)
        sb[:, :kt] = b.scale
        sb, rb = sb.t(), SM.BlockWise128x128                                 # (L4, Nt)
    else:
        sb, rb = _pad_rows(b.scale.float(), 16).t().contiguous().t(), SM.BlockWise1x128
    out = F.scaled_mm(ad, bd.t(), sa, SM.BlockWise1x128, sb, rb, ST.NO_SWIZZLE, ST.NO_SWIZZLE,
                      output_dtype=_OUT_DTYPE["blockwise"])
    return out[:M, :N].float()


def _mm_triton(a: QTensor, b: QTensor) -> torch.Tensor:
    """One launch: m-grouped with one group for b in 128x128 blocks; for the wgrad's operands (128x1 tiles
    seen transposed, ``QTensor.t()``) k-grouped with one segment over their rows."""
    from model.kernels.fp8_grouped import dense_fp8_mm, dense_fp8_wgrad
    if b.tile == WEIGHT_TILE:
        return dense_fp8_mm(a.data, a.scale, b.data, b.scale)
    if a.data.stride(0) != 1 or b.data.stride(0) != 1:
        raise ValueError("fp8_mm(kernel='triton'): a 1x128 b must be a 128x1-tiled tensor seen transposed (wgrad)")
    at, bt = a.t(), b.t()
    return dense_fp8_wgrad(at.data, at.scale, bt.data, bt.scale)


def fp8_mm(a: QTensor, b: QTensor, kernel: str) -> torch.Tensor:
    """a (M, K) 1x128 tiles, b (N, K) 128x128 blocks or 1x128 tiles -> fp32 (M, N) = a @ b^T."""
    if a.tile != ACT_TILE or b.tile not in (WEIGHT_TILE, ACT_TILE) or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_mm: bad operands a.tile={a.tile} {a.shape}, b.tile={b.tile} {b.shape}")
    if kernel == "emulated":
        return _mm_emulated(a, b)
    if kernel == "rowwise":
        return _mm_rowwise(a, b)
    if kernel == "blockwise":
        # blockwise scaled_mm is CUDA-only; a CPU tensor (model kept on CPU) takes the rowwise path
        return _mm_blockwise(a, b) if a.data.is_cuda else _mm_rowwise(a, b)
    if kernel == "triton":
        return _mm_triton(a, b)
    raise ValueError(f"fp8 kernel={kernel!r}: must be one of {KERNELS}")


# ----------------------------------------------------------------------------- FP8 linear

def quantizers(kernel: str) -> Any:
    """The module whose quantize_act / _wgrad / _dual / _weight / _experts, retile_wgrad and quantize_segments
    feed ``kernel``: the fused Triton ones for the Triton kernels, else model/fp8.py (their oracle, same bits)."""
    if kernel == "triton":
        from model.kernels import fp8_quant
        return fp8_quant
    from model import fp8
    return fp8


def _dgrad(dyq: QTensor, wq: QTensor, kernel: str) -> torch.Tensor:
    """dy (M, N) 1x128, W (N, K) blocks -> fp32 (M, K) = dy @ W (Triton reads W transposed, no view)."""
    if kernel == "triton":
        from model.kernels.fp8_grouped import dense_fp8_mm
        return dense_fp8_mm(dyq.data, dyq.scale, wq.data, wq.scale, transpose_b=True)
    return fp8_mm(dyq, wq.t(), kernel)


def _wgrad(dy_w: QTensor, x_w: QTensor, kernel: str) -> torch.Tensor:
    """dy (M, N), x (M, K), both 128x1 -> fp32 (N, K) = dy^T @ x (Triton: no transposed views)."""
    if kernel == "triton":
        from model.kernels.fp8_grouped import dense_fp8_wgrad
        return dense_fp8_wgrad(dy_w.data, dy_w.scale, x_w.data, x_w.scale)
    return fp8_mm(dy_w.t(), x_w.t(), kernel)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str, pow2: bool,
                cache_fp8: bool, w_fp8: QTensor | None) -> torch.Tensor:
        """x (M, K), weight (N, K) (and its FP8 copy, or None), bias (N,) or None -> (M, N) in x.dtype."""
        xq = quantizers(kernel).quantize_act(x, pow2)
        wq = (w_fp8 if w_fp8 is not None else
              quantizers(kernel).quantize_weight(weight, pow2) if kernel == "triton" else quantize_weight(weight, pow2))
        y = fp8_mm(xq, wq, kernel)                                           # (M, N) fp32
        if bias is not None:
            y = y + bias.float()
        # the memory win: x is kept as fp8 + 1/128 scales instead of x.dtype
        saved_x = (xq.data, xq.scale) if cache_fp8 else (x, x.new_empty(0))
        ctx.save_for_backward(*saved_x, wq.data, wq.scale)
        ctx.meta = (kernel, pow2, cache_fp8, tuple(x.shape), tuple(weight.shape), x.dtype, weight.dtype,
                    bias is not None)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kernel, pow2, cache_fp8, x_shape, w_shape, x_dtype, w_dtype, has_bias = ctx.meta
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        wq = QTensor(w_data, w_scale, WEIGHT_TILE, w_shape)
        dy = dy.contiguous()
        qz = quantizers(kernel)
        dx = dw = db = None
        need_dx, need_dw = ctx.needs_input_grad[:2]
        # dy in 1x128 tiles (dgrad) and 128x1 (wgrad); one read of dy when both are needed
        dy_a, dy_w = (qz.quantize_dual(dy, pow2) if need_dx and need_dw
                      else (qz.quantize_act(dy, pow2) if need_dx else None, qz.quantize_wgrad(dy, pow2) if need_dw
                            else None))
        if need_dx:
            dx = _dgrad(dy_a, wq, kernel).to(x_dtype)                         # (M, K)
        if need_dw:
            x_w = (qz.retile_wgrad(QTensor(x_data, x_scale, ACT_TILE, x_shape), pow2) if cache_fp8
                   else qz.quantize_wgrad(x_data, pow2))                     # (M, K) 128x1
            dw = _wgrad(dy_w, x_w, kernel).to(w_dtype)                       # (N, K)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(w_dtype)
        return dx, dw, db, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "emulated",
               pow2: bool = False, cache_fp8: bool = True, w_fp8: QTensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) with all three GEMMs in FP8; ``w_fp8``: the weight already quantized."""
    y = _FP8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias, kernel, pow2, cache_fp8, w_fp8)
    return y.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8. Same ``weight``/``bias`` parameters (made by
    ``apply_fp8`` swapping the class of an existing nn.Linear, so nothing is copied)."""
    fp8_kernel: str = "emulated"
    fp8_pow2: bool = False
    cache_fp8: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.setdefault("_fp8_weights", {})                # the class is swapped in: no __init__
        quantizer = quantizers("triton").quantize_weight if self.fp8_kernel == "triton" else quantize_weight
        w_fp8 = cached_fp8(cache, self.weight, self.fp8_pow2, quantizer)
        return fp8_linear(x, self.weight, self.bias, self.fp8_kernel, self.fp8_pow2, self.cache_fp8, w_fp8)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.fp8_kernel}"


# ----------------------------------------------------------------------------- FP8 grouped GEMM

GROUPED_KERNELS = ("emulated", "triton")

# Bumped after every optimizer step (torch calls global step hooks for every optimizer, DeepSpeed's
# inner one included): the experts' FP8 weight copies are reused across micro-steps only while it holds.
_WEIGHT_EPOCH = [0]


def _weights_stepped(*_: object) -> None:
    _WEIGHT_EPOCH[0] += 1


register_optimizer_step_post_hook(_weights_stepped)


def cached_fp8(cache: dict, w: torch.Tensor, pow2: bool, quantizer: Any) -> Any:
    """quantizer(w, pow2), reused from ``cache`` while w is unchanged: same storage, same in-place version
    counter, no optimizer step since (``.data`` writes escape the version counter, the step hook does not)."""
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, pow2, _WEIGHT_EPOCH[0])
    hit = cache.get(id(w))
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, quantizer(w, pow2))
        cache[id(w)] = hit
    return hit[1]


def quantized_experts(cache: dict, w: torch.Tensor, pow2: bool, kernel: str = "emulated"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """w (E, K, M) -> quantize_experts(w) (the fused Triton one for the triton kernel: the same bits),
    reused across micro-steps (``cached_fp8``)."""
    if kernel == "triton":
        return cached_fp8(cache, w, pow2, quantizers(kernel).quantize_experts)
    return cached_fp8(cache, w, pow2, lambda w_, p: quantize_experts(w_, p))


def _pad_cols(t: torch.Tensor, mult: int) -> torch.Tensor:
    return t if t.shape[1] % mult == 0 else F.pad(t, (0, -t.shape[1] % mult))


def _grouped_emulated(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp32 a (N, kp) @ b[e] (kp, np) by segments, one torch._grouped_mm where torch has it (CPU); on CUDA
    it has no fp32 grouped kernel and the emulated oracle loops (and reads counts on the host)."""
    if _native_ok(a, b):
        return torch._grouped_mm(a, b, offs=counts.cumsum(0).to(torch.int32))
    return _loop_mm(a, b, counts.tolist())


def _wgrad_emulated(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp32 a (N, K), b (N, M) -> (E, K, M) = a_e^T b_e (columns padded to 16 B for the grouped kernel)."""
    K, M = a.shape[1], b.shape[1]
    a4, b4 = _pad_cols(a, 4), _pad_cols(b, 4)
    if _native_ok(a4, b4[None]):
        return torch._grouped_mm(a4.t(), b4, offs=counts.cumsum(0).to(torch.int32))[:, :K, :M]
    return _loop_wgrad(a, b, counts.tolist())


def grouped_plan(counts: torch.Tensor, n_rows: int, kernel: str) -> Any:
    """The Triton m-grouped kernel's tile plan (made once, shared by forward and dgrad), else None."""
    if kernel != "triton":
        return None
    from model.kernels.fp8_grouped import M_GROUPED_BLOCKS, tile_plan
    return tile_plan(counts, n_rows, M_GROUPED_BLOCKS[0])


def grouped_fwd(xq: QTensor, w_data: torch.Tensor, w_scale: torch.Tensor, counts: torch.Tensor, kernel: str,
                transpose_w: bool = False, plan: Any = None) -> torch.Tensor:
    """xq (N, k) 1x128 tiles, experts w (E, K, M) in 128x128 blocks -> fp32 (N, M) = x_e @ w[e]
    (or, with transpose_w, (N, K) = x_e @ w[e]^T: the dgrad). One grouped GEMM either way."""
    E, K, M = w_data.shape
    n_out = K if transpose_w else M
    if kernel == "triton":
        from model.kernels.fp8_grouped import m_grouped_fp8
        plan = plan if plan is not None else grouped_plan(counts, xq.shape[0], kernel)
        return m_grouped_fp8(xq.data, xq.scale, w_data, w_scale, plan, transpose_b=transpose_w)
    wd = dequantize_experts(w_data, w_scale)                                 # (E, Kp, Mp) fp32
    wd = wd.transpose(1, 2) if transpose_w else wd                           # (E, k, n) for x (N, k)
    # the output's columns sliced off in b (a strided view), so the output owns no padding, unless the
    # grouped kernel's 16-byte rule needs them (then the padded output is sliced and copied)
    n_b = n_out if n_out % 4 == 0 else wd.shape[2]
    out = _grouped_emulated(dequantize_act_padded(xq), wd[:, :, :n_b], counts)
    return out if n_b == n_out else out[:, :n_out].contiguous()


def grouped_wgrad(x_seg: tuple[torch.Tensor, torch.Tensor], dy_seg: tuple[torch.Tensor, torch.Tensor],
                  seg: Segments, counts: torch.Tensor, kernel: str) -> torch.Tensor:
    """x (N, K) and dy (N, M) in 128x1 tiles per expert segment -> fp32 (E, K, M) = x_e^T @ dy_e."""
    if kernel == "triton":
        from model.kernels.fp8_grouped import k_grouped_fp8
        return k_grouped_fp8(*x_seg, *dy_seg, seg.start, seg.end, seg.tile_first)
    return _wgrad_emulated(dequantize_segments(*x_seg, seg), dequantize_segments(*dy_seg, seg), counts)


class _FP8GroupedFn(torch.autograd.Function):
    """Forward, dgrad and wgrad each one grouped GEMM over all experts; no host reads of counts."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, w_data: torch.Tensor,
                w_scale: torch.Tensor, kernel: str, pow2: bool, cache_fp8: bool) -> torch.Tensor:
        """x (N, K) sorted by expert, w (E, K, M) and its FP8 copy, counts (E,) -> (N, M) in x.dtype."""
        xq = quantizers(kernel).quantize_act(x, pow2)
        ctx.plan = grouped_plan(counts, x.shape[0], kernel)                 # plain tensors of counts: no grads
        y = grouped_fwd(xq, w_data, w_scale, counts, kernel, plan=ctx.plan)
        saved_x = (xq.data, xq.scale) if cache_fp8 else (x, x.new_empty(0))
        ctx.save_for_backward(*saved_x, w_data, w_scale, counts)
        ctx.meta = (kernel, pow2, cache_fp8, tuple(x.shape), x.dtype, w.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kernel, pow2, cache_fp8, x_shape, x_dtype, w_dtype = ctx.meta
        x_data, x_scale, w_data, w_scale, counts = ctx.saved_tensors
        dy = dy.contiguous()                                                 # (N, M)
        qz = quantizers(kernel)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grouped_fwd(qz.quantize_act(dy, pow2), w_data, w_scale, counts, kernel, transpose_w=True,
                             plan=ctx.plan).to(x_dtype)
        if ctx.needs_input_grad[1]:
            # the Triton path reads only the segment bounds; the torch quantizer also needs each row's tile
            seg = segments(counts, dy.shape[0], with_rows=kernel != "triton")
            # the cached 1x128 x is dequantized and re-tiled 128x1 per expert segment (as DeepSeek-V3 does;
            # the Triton quantizer fuses the dequantize)
            x_c = QTensor(x_data, x_scale, ACT_TILE, x_shape) if cache_fp8 else x_data
            if cache_fp8 and kernel != "triton":
                x_c = dequantize_act_padded(x_c)[:, :x_shape[1]]
            dw = grouped_wgrad(qz.quantize_segments(x_c, seg, pow2), qz.quantize_segments(dy, seg, pow2), seg, counts,
                               kernel).to(w_dtype)
        return dx, dw, None, None, None, None, None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, kernel: str = "emulated",
                   pow2: bool = False, cache_fp8: bool = True,
                   w_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x (N, K) sorted by expert, w (E, K, M), counts (E,) -> (N, M); FP8 drop-in for grouped_mm.
    ``w_fp8``: w already quantized (``quantized_experts``); kernel: emulated | triton."""
    if kernel not in GROUPED_KERNELS:
        raise ValueError(f"fp8 grouped kernel={kernel!r}: must be one of {GROUPED_KERNELS}")
    if w_fp8 is None:
        w_fp8 = quantizers(kernel).quantize_experts(w, pow2) if kernel == "triton" else quantize_experts(w, pow2)
    w_data, w_scale = w_fp8
    return _FP8GroupedFn.apply(x.contiguous(), w, counts, w_data, w_scale, kernel, pow2, cache_fp8)


def fp8_grouped_reference(x: torch.Tensor, w: torch.Tensor, counts: list[int], dy: torch.Tensor,
                          pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The oracle: y, dx, dw of the grouped FP8 GEMM, one expert at a time, with the per-tensor quantizers
    and the emulated fp8_mm (x cached 1x128 and re-tiled 128x1 per expert segment, as the fast path does)."""
    E, K, M = w.shape
    ys, dxs, dw, lo = [], [], torch.zeros(E, K, M), 0
    for e, n in enumerate(counts):
        if n:
            xq, dyq = quantize_act(x[lo:lo + n], pow2), quantize_act(dy[lo:lo + n], pow2)
            wq = quantize(w[e], WEIGHT_TILE, pow2)                           # (K, M) blocks
            ys.append(fp8_mm(xq, wq.t(), "emulated"))                        # (n, M)
            dxs.append(fp8_mm(dyq, wq, "emulated"))                          # (n, K)
            dw[e] = fp8_mm(retile_wgrad(xq, pow2).t(), quantize_wgrad(dy[lo:lo + n], pow2).t(), "emulated")
        lo += n
    return torch.cat(ys) if ys else x.new_zeros(0, M), torch.cat(dxs) if dxs else x.new_zeros(0, K), dw


class FP8RoutedExperts(RoutedExperts):
    """RoutedExperts with both grouped GEMMs in FP8. Same ``w_gate_up``/``w_down`` parameters, so
    checkpoints and model/hf/convert.py see no difference. ``forward_reference`` stays high precision.
    The weights' FP8 copies live in ``_fp8_weights`` (a plain dict, not state) between micro-steps."""
    fp8_kernel: str = "emulated"
    fp8_pow2: bool = False
    cache_fp8: bool = True
    traceable = False   # autograd.Function around Triton / emulated kernels: runs eagerly under torch.compile

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.setdefault("_fp8_weights", {})                # the class is swapped in: no __init__
        w_fp8 = quantized_experts(cache, w, self.fp8_pow2, self.fp8_kernel)
        return fp8_grouped_mm(x, w, counts, kernel=self.fp8_kernel, pow2=self.fp8_pow2, cache_fp8=self.cache_fp8,
                              w_fp8=w_fp8)
