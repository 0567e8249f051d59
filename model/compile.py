"""torch.compile of the decoder blocks, where it pays: inductor fuses the elementwise work
between the GEMMs (RMSNorm, RoPE, SwiGLU, residual adds, the router's scoring) into a few
kernels, forward and backward.

Each block (main stack and MTP) and the final norm is compiled in place (``nn.Module.compile``),
so parameter names, state dicts and checkpoints are unchanged. The MoE dispatch (permute,
grouped GEMM, all-to-all) stays eager behind a graph break (``model.moe._dispatch``), and the
chunked loss stays eager too (its chunk loop would be unrolled). The first step pays the
compilation (tens of seconds on a CPU), so it is an option for long runs: ``train.compile``.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, mode: str | None = None) -> int:
    """Compile every decoder block and the final norm of a DeepseekV3 in place; returns how many
    modules. ``mode``: torch.compile's mode (None: its default)."""
    modules = list(model.layers) + [m.block for m in model.mtp] + [model.norm]
    for m in modules:
        m.compile(mode=mode)
    return len(modules)
