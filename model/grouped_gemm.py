"""Grouped GEMM: one matmul per expert over contiguous row segments, as one call.

x (N, K) rows are sorted by expert; counts (E,) says how many rows each expert owns;
w (E, K, M). Row segment e of the output is x[seg_e] @ w[e]. ``torch._grouped_mm`` runs
all segments in one call (CPU fp32/bf16, Hopper bf16); on sm80-sm89 bf16/fp16 DeepSpeed's Triton
grouped GEMM does (model/kernels/ds_grouped.py); elsewhere a loop over segments gives the same
numbers. Both backward GEMMs are grouped too:
dx = dy @ w^T per segment,  dw[e] = x[seg_e]^T @ dy[seg_e].
"""
from __future__ import annotations

from typing import Any

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


# torch._grouped_mm as custom ops: torch's own meta function accepts only bf16, so a compiled
# graph could not trace the fp32 op; as a custom op with its output shape spelled out below it is
# one opaque node that torch.compile keeps inside the graph (the MoE block compiles whole).
@torch.library.custom_op("moe_trainer::grouped_mm", mutates_args=())
def _native_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (N, K) sorted by group, w (E, K, M), offs (E,) int32 cumulative row ends -> (N, M)."""
    return torch._grouped_mm(x, w, offs=offs)


@_native_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moe_trainer::grouped_mm_wgrad", mutates_args=())
def _native_wgrad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (N, K), dy (N, M) -> (E, K, M): x[seg_e]^T @ dy[seg_e] for each group e."""
    return torch._grouped_mm(x.t(), dy, offs=offs)


@_native_wgrad.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _native_setup(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _native_backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, w, offs = ctx.saved_tensors
    dy = dy.contiguous()  # autograd may hand us an expanded (stride-0) gradient
    dx = _native_mm(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = _native_wgrad(x, dy, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_native_mm.register_autograd(_native_backward, setup_context=_native_setup)


class _LoopGroupedMM(torch.autograd.Function):
    """The reference path (and the fallback where torch._grouped_mm cannot run): a loop over
    segments, with both backward GEMMs spelled out the same way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, counts)
        return _loop_mm(x, w, counts.tolist())

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, counts = ctx.saved_tensors
        dy = dy.contiguous()  # autograd may hand us an expanded (stride-0) gradient
        c = counts.tolist()
        dx = _loop_mm(dy, w.transpose(1, 2), c) if ctx.needs_input_grad[0] else None
        dw = _loop_wgrad(x, dy, c) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def kernel_for(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> str:
    """Which grouped GEMM a (device, dtype) gets: "torch" (torch._grouped_mm: CPU, Hopper+ bf16),
    "deepspeed-triton" (bf16/fp16 on sm80-sm89, where torch would loop over experts and read the
    offsets on the host), or "loop" (the reference: anything else, e.g. fp32 on a GPU)."""
    if device_type == "cuda":
        if dtype in (torch.bfloat16, torch.float16) and capability is not None and capability[0] == 8:
            return "deepspeed-triton"
        return "torch" if dtype == torch.bfloat16 and capability is not None and capability[0] >= 9 else "loop"
    return "torch" if dtype in (torch.float32, torch.bfloat16) else "loop"


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, native: bool | None = None) -> torch.Tensor:
    """x (N, K) sorted by group, w (E, K, M), counts (E,) int with sum N -> (N, M).
    ``native=False`` forces the loop reference; None picks by device and dtype (``kernel_for``)."""
    if native is None and x.is_cuda:
        cap = torch.cuda.get_device_capability(x.device)
        if kernel_for("cuda", x.dtype, cap) == "deepspeed-triton":
            from model.kernels.ds_grouped import available, ds_grouped_mm
            if available(x.device) is None:
                return ds_grouped_mm(x, w, counts)
    if native is None:
        native = _native_ok(x, w)
    if native:
        return _native_mm(x.contiguous(), w, counts.cumsum(0).to(torch.int32))
    return _LoopGroupedMM.apply(x.contiguous(), w, counts)
