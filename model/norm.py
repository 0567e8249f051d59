"""RMSNorm, computed in fp32 whatever the activation dtype (as DeepSeek-V3 and HF do)."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's fused kernel: one pass forward and backward instead of five elementwise ops;
            # in fp32 the same math as the reference below (tests/test_attention.py compares them)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in fp32, cast back, then scale (the order HF's DeepSeek-V3 uses in bf16)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
