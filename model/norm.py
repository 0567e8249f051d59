"""RMSNorm, computed in fp32 whatever the activation dtype (as DeepSeek-V3 and HF do)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward: the reduction for 1/rms is one vector_norm, and
    the backward reuses it instead of replaying the five-op decomposition that autograd records
    for F.rms_norm on CPU (1.38x on forward+backward at 2048 x 256, fewer passes over memory).

    y = x * r * w with r = 1 / sqrt(mean(x^2) + eps);  with x^ = x * r and gw = g * w:
    dx = r * (gw - x^ * mean(gw * x^)),  dw = sum over rows of g * x^."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        D = x.shape[-1]
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(D).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        D = x.shape[-1]
        xhat = x * r                                                             # (..., D)
        dw = (g * xhat).reshape(-1, D).sum(0) if ctx.needs_input_grad[1] else None
        gw = g * weight
        mean_dot = (gw * xhat).sum(-1, keepdim=True).div_(D)                     # (..., 1)
        dx = gw.sub_(xhat.mul_(mean_dot)).mul_(r) if ctx.needs_input_grad[0] else None
        return dx, dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # in fp32 the same math as the reference below (tests/test_fast_paths.py compares them)
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in fp32, cast back, then scale (the order HF's DeepSeek-V3 uses in bf16)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
