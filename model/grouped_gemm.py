"""Grouped GEMM: one matmul per expert over contiguous row segments, as one call.

x (N, K) rows are sorted by expert; counts (E,) says how many rows each expert owns;
w (E, K, M). Row segment e of the output is x[seg_e] @ w[e]. ``torch._grouped_mm`` runs
all segments in one kernel (CPU fp32/bf16, Hopper bf16); elsewhere a loop over segments gives
the same numbers. The autograd function spells out both backward GEMMs so the backward is
grouped too:  dx = dy @ w^T per segment,  dw[e] = x[seg_e]^T @ dy[seg_e].
"""
from __future__ import annotations

import torch


def _native_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.dtype not in (torch.float32, torch.bfloat16):
        return False
    # the kernel needs 16-byte aligned row strides for every operand (K and M)
    per16 = 16 // x.element_size()
    return x.shape[1] % per16 == 0 and w.shape[2] % per16 == 0


def _loop_mm(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(N, K) x (E, K, M) by segments -> (N, M)."""
    outs = [seg @ b[e] for e, seg in enumerate(a.split(counts)) if counts[e] > 0]
    if not outs:
        return a.new_zeros(0, b.shape[2])
    return torch.cat(outs)


def _loop_wgrad(a: torch.Tensor, dy: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """sum over segment e of a_e^T dy_e -> (E, K, M); empty experts get zeros."""
    out = a.new_zeros(len(counts), a.shape[1], dy.shape[1])
    for e, (ae, de) in enumerate(zip(a.split(counts), dy.split(counts))):
        if counts[e] > 0:
            out[e] = ae.t() @ de
    return out


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts, use_native):
        ctx.save_for_backward(x, w, counts)
        ctx.use_native = use_native
        if use_native:
            offs = counts.cumsum(0).to(torch.int32)
            return torch._grouped_mm(x, w, offs=offs)
        return _loop_mm(x, w, counts.tolist())

    @staticmethod
    def backward(ctx, dy):
        x, w, counts = ctx.saved_tensors
        dy = dy.contiguous()  # autograd may hand us an expanded (stride-0) gradient
        dx = dw = None
        if ctx.use_native:
            offs = counts.cumsum(0).to(torch.int32)
            if ctx.needs_input_grad[0]:
                dx = torch._grouped_mm(dy, w.transpose(1, 2), offs=offs)
            if ctx.needs_input_grad[1]:
                dw = torch._grouped_mm(x.t(), dy, offs=offs)
        else:
            c = counts.tolist()
            if ctx.needs_input_grad[0]:
                dx = _loop_mm(dy, w.transpose(1, 2), c)
            if ctx.needs_input_grad[1]:
                dw = _loop_wgrad(x, dy, c)
        return dx, dw, None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, native: bool | None = None) -> torch.Tensor:
    """x (N, K) sorted by group, w (E, K, M), counts (E,) int with sum N -> (N, M)."""
    if native is None:
        native = _native_ok(x, w)
    return _GroupedMM.apply(x.contiguous(), w, counts, native)
