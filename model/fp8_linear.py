"""FP8 linear and FP8 grouped expert GEMM (DeepSeek-V3 recipe) as autograd functions.

Every GEMM here is "NT": out (M, N) = a (M, K) @ b (N, K)^T, accumulated in fp32, with a
quantized in 1x128 tiles along K and b in 128x128 blocks (weights) or 1x128 tiles (activations).
The three GEMMs of a linear y = x W^T (x (M,K), W (N,K)):
  forward  y  (M,N) = x_q[1x128]          @ W_q[128x128]^T
  dgrad    dx (M,K) = dy_q[1x128]         @ (W_q^T)[128x128]^T
  wgrad    dW (N,K) = (dy_q[128x1])^T     @ (x_q[128x1])^T^T     (contracts over tokens M)
Only FP8 tensors + scales are saved for backward (``cache_fp8``); x is re-tiled 1x128 -> 128x1 in
backward. Master weights and weight gradients stay in the weight's dtype (fp32).

Kernels (see ``resolve_backend``):
  emulated   dequantize exactly, fp32 matmul. Runs anywhere; the test oracle.
  rowwise    torch._scaled_mm with row-wise scales, one call per 128-wide K chunk, partial sums
             added in fp32 -- the tile recipe expressed with row-wise scaling (also what DeepSeek
             means by "promote to FP32 every 128 elements of K"). Works on CPU and pre-blockwise GPUs.
  blockwise  torch.nn.functional.scaled_mm with BlockWise1x128 / BlockWise128x128 (Hopper, CUDA 12.9+).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.fp8 import (
    ACT_TILE,
    WEIGHT_TILE,
    QTensor,
    quantize,
    quantize_act,
    quantize_weight,
    quantize_wgrad,
    rel_err,
    retile_wgrad,
)
from model.grouped_gemm import _loop_mm, _native_ok
from model.moe import RoutedExperts

log = logging.getLogger(__name__)
KERNELS = ("emulated", "rowwise", "blockwise")


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
    raise ValueError(f"fp8 kernel={kernel!r}: must be one of {KERNELS}")


# ----------------------------------------------------------------------------- backend choice

_PROBED: dict[str, tuple[str, str]] = {}


def _probe(kernel: str, device: torch.device) -> str | None:
    """Run one small GEMM of each kind on ``device`` and compare with the emulated oracle.
    Returns None when it works, else why not."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(256, 512, generator=g).to(device)
    w = torch.randn(384, 512, generator=g).to(device)
    xq, wq = quantize_act(x), quantize_weight(w)
    pairs = [(xq, wq), (quantize_wgrad(x).t(), quantize_wgrad(torch.randn(256, 384, generator=g).to(device)).t())]
    try:
        for a, b in pairs:
            err = rel_err(fp8_mm(a, b, kernel), _mm_emulated(a, b))
            if not err < 1e-2:                                               # bf16-output tolerance
                return f"mismatch vs emulated (rel err {err:.2e})"
    except Exception as e:  # noqa: BLE001 -- any failure means "not supported here"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None) -> tuple[str, str]:
    """fp8.backend (auto | emulated | cuda) -> (kernel, reason). cuda tries blockwise, then
    rowwise, then falls back to emulated, each verified numerically on the device."""
    if backend not in ("auto", "emulated", "cuda"):
        raise ValueError(f"fp8.backend={backend!r}: must be auto, emulated or cuda")
    if backend == "emulated":
        return "emulated", "requested"
    if not torch.cuda.is_available():
        if backend == "cuda":
            raise ValueError("fp8.backend='cuda' but torch.cuda.is_available() is False")
        return "emulated", "no CUDA device"
    # a model is usually built on CPU and moved to the GPU later: probe where it will train
    dev = torch.device(device) if device is not None and torch.device(device).type == "cuda" else torch.device("cuda")
    key = str(dev)
    if key not in _PROBED:
        why = {}
        for kernel in ("blockwise", "rowwise"):
            if kernel == "blockwise" and not hasattr(F, "scaled_mm"):
                why[kernel] = "torch has no F.scaled_mm"
                continue
            for out_dtype in (torch.float32, torch.bfloat16):
                _OUT_DTYPE[kernel] = out_dtype
                why[kernel] = _probe(kernel, dev)
                if why[kernel] is None:
                    break
            if why[kernel] is None:
                _PROBED[key] = (kernel, f"{kernel} scaled_mm ({str(_OUT_DTYPE[kernel])[6:]} out) verified on "
                                f"{torch.cuda.get_device_name(dev)}"
                                + (f" (blockwise unavailable: {why['blockwise']})" if kernel == "rowwise" else ""))
                break
        else:
            _PROBED[key] = ("emulated", f"no scaled_mm kernel works here: {why}")
    return _PROBED[key]


# ----------------------------------------------------------------------------- FP8 linear

class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str, pow2: bool,
                cache_fp8: bool) -> torch.Tensor:
        """x (M, K), weight (N, K), bias (N,) or None -> (M, N) in x.dtype."""
        xq, wq = quantize_act(x, pow2), quantize_weight(weight, pow2)
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
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = fp8_mm(quantize_act(dy, pow2), wq.t(), kernel).to(x_dtype)       # (M, K)
        if ctx.needs_input_grad[1]:
            x_w = (retile_wgrad(QTensor(x_data, x_scale, ACT_TILE, x_shape), pow2) if cache_fp8
                   else quantize_wgrad(x_data, pow2))                        # (M, K) 128x1
            dw = fp8_mm(quantize_wgrad(dy, pow2).t(), x_w.t(), kernel).to(w_dtype)  # (N, K)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(w_dtype)
        return dx, dw, db, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "emulated",
               pow2: bool = False, cache_fp8: bool = True) -> torch.Tensor:
    """x (..., K) -> (..., N) with all three GEMMs in FP8."""
    y = _FP8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias, kernel, pow2, cache_fp8)
    return y.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8. Same ``weight``/``bias`` parameters (made by
    ``apply_fp8`` swapping the class of an existing nn.Linear, so nothing is copied)."""
    fp8_kernel: str = "emulated"
    fp8_pow2: bool = False
    cache_fp8: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.fp8_kernel, self.fp8_pow2, self.cache_fp8)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.fp8_kernel}"


# ----------------------------------------------------------------------------- FP8 grouped GEMM

def _quantize_experts(w: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w (E, K, M) (in, out) layout -> data (E, K, M) fp8, scale (E, Kt, Mt): 128x128 blocks per
    expert (a block's scale is the same whichever way the GEMM reads it)."""
    qs = [quantize(w[e], WEIGHT_TILE, pow2) for e in range(w.shape[0])]
    return torch.stack([q.data for q in qs]), torch.stack([q.scale for q in qs])


def _rows(q: QTensor, lo: int, hi: int) -> QTensor:
    """Rows lo:hi of a 1x128-tiled QTensor (tiles never span rows, so this is a plain slice)."""
    return QTensor(q.data[lo:hi], q.scale[lo:hi], q.tile, (hi - lo, q.shape[1]))


class _FP8GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, kernel: str, pow2: bool,
                cache_fp8: bool) -> torch.Tensor:
        """x (N, K) sorted by expert, w (E, K, M), counts (E,) -> (N, M) in x.dtype."""
        E, K, M = w.shape
        xq = quantize_act(x, pow2)
        w_data, w_scale = _quantize_experts(w, pow2)
        c = counts.tolist()
        if kernel == "emulated":
            xd = xq.dequantize()                                             # (N, K) fp32
            wd = torch.stack([QTensor(w_data[e], w_scale[e], WEIGHT_TILE, (K, M)).dequantize()
                              for e in range(E)])                            # (E, K, M) fp32
            if _native_ok(xd, wd):
                y = torch._grouped_mm(xd, wd, offs=counts.cumsum(0).to(torch.int32))
            else:
                y = _loop_mm(xd, wd, c)
        else:
            outs, lo = [], 0
            for e, n in enumerate(c):
                if n:
                    we = QTensor(w_data[e], w_scale[e], WEIGHT_TILE, (K, M)).t()   # (M, K) for NT
                    outs.append(fp8_mm(_rows(xq, lo, lo + n), we, kernel))
                lo += n
            y = torch.cat(outs) if outs else x.new_zeros(0, M, dtype=torch.float32)
        saved_x = (xq.data, xq.scale) if cache_fp8 else (x, x.new_empty(0))
        ctx.save_for_backward(*saved_x, w_data, w_scale, counts)
        ctx.meta = (kernel, pow2, cache_fp8, tuple(x.shape), (E, K, M), x.dtype, w.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kernel, pow2, cache_fp8, x_shape, (E, K, M), x_dtype, w_dtype = ctx.meta
        x_data, x_scale, w_data, w_scale, counts = ctx.saved_tensors
        dy = dy.contiguous()                                                 # (N, M)
        c = counts.tolist()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq = quantize_act(dy, pow2)                                     # 1x128 along M
            parts, lo = [], 0
            for e, n in enumerate(c):
                if n:
                    we = QTensor(w_data[e], w_scale[e], WEIGHT_TILE, (K, M))  # (K, M): contracts M
                    parts.append(fp8_mm(_rows(dyq, lo, lo + n), we, kernel))
                lo += n
            dx = (torch.cat(parts) if parts else dy.new_zeros(0, K, dtype=torch.float32)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            xq = QTensor(x_data, x_scale, ACT_TILE, x_shape) if cache_fp8 else None
            dw = torch.zeros(E, K, M, dtype=w_dtype, device=dy.device)
            lo = 0
            for e, n in enumerate(c):
                if n:
                    # 128x1 tiles per expert segment, so no tile straddles two experts
                    xe = (retile_wgrad(_rows(xq, lo, lo + n), pow2) if cache_fp8
                          else quantize_wgrad(x_data[lo:lo + n], pow2))
                    dye = quantize_wgrad(dy[lo:lo + n], pow2)
                    dw[e] = fp8_mm(xe.t(), dye.t(), kernel).to(w_dtype)     # (K, M) = x_e^T dy_e
                lo += n
        return dx, dw, None, None, None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, kernel: str = "emulated",
                   pow2: bool = False, cache_fp8: bool = True) -> torch.Tensor:
    """x (N, K) sorted by expert, w (E, K, M), counts (E,) -> (N, M); FP8 drop-in for grouped_mm."""
    return _FP8GroupedFn.apply(x.contiguous(), w, counts, kernel, pow2, cache_fp8)


class FP8RoutedExperts(RoutedExperts):
    """RoutedExperts with both grouped GEMMs in FP8. Same ``w_gate_up``/``w_down`` parameters, so
    checkpoints and model/hf/convert.py see no difference. ``forward_reference`` stays high precision."""
    fp8_kernel: str = "emulated"
    fp8_pow2: bool = False
    cache_fp8: bool = True
    traceable = False   # per-expert host loops (counts.tolist()): runs eagerly under torch.compile

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_mm(x, w, counts, kernel=self.fp8_kernel, pow2=self.fp8_pow2, cache_fp8=self.cache_fp8)
