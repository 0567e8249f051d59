"""torch.compile of the decoder blocks: inductor fuses the elementwise work between the GEMMs
(RMSNorm, RoPE, SwiGLU, residual adds, the router's scoring, the permutation) into a few
kernels, forward and backward, and frees what they would have kept in between.

Each block (main stack and MTP) and the final norm is compiled in place (``nn.Module.compile``),
so parameter names, state dicts and checkpoints are unchanged. On one device the whole MoE layer
is in the block's graph (the grouped GEMM is a custom op with a shape function); an all-to-all
dispatcher and FP8 experts run eagerly behind a graph break (``model.moe._dispatch``). The
chunked loss stays eager (its chunk loop would be unrolled). The first step pays the compilation,
so it is an option for long runs: ``train.compile``. On the 2-core CPU it saves a fifth of the
step's memory but no time (benchmarks/results/training_speed.md); it is unmeasured on a GPU so far.
Under ``parallel.pp`` each rank compiles the blocks of its own stages (1f1b, interleaved); DualPipeV
refuses it (parallel/pipeline/plan.py: its split backward runs a block's backward graph twice).
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, mode: str | None = None) -> int:
    """Compile every decoder block and the final norm of a DeepseekV3 in place; returns how many
    modules. ``mode``: torch.compile's mode (None: its default)."""
    from model.moe import run_dispatch_eagerly_under_compile

    run_dispatch_eagerly_under_compile()
    modules = [m for m in list(model.layers) + [m.block for m in model.mtp] + [model.norm]
               if not isinstance(m, nn.Identity)]   # parallel.pp: a stage the final norm is not on holds Identity
    for m in modules:
        m.compile(mode=mode)
    return len(modules)
