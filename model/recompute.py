"""Activation checkpointing of decoder blocks that keeps the routed-token counts exact.

Each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant). Its
recomputation in backward would route the same tokens a second time, so the recompute
context switches ``count_tokens`` off on the block's MoE modules: the balancing counts
are the same with and without checkpointing.
"""
from __future__ import annotations

import contextlib
import functools

from torch.utils.checkpoint import checkpoint

from model.moe import MoE


@contextlib.contextmanager
def _no_counting(moes):
    saved = [m.count_tokens for m in moes]
    for m in moes:
        m.count_tokens = False
    try:
        yield
    finally:
        for m, s in zip(moes, saved):
            m.count_tokens = s


def apply_activation_checkpointing(model) -> int:
    """Wrap every decoder block (main stack and MTP) of a DeepseekV3; returns how many."""
    blocks = list(model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        moes = [m for m in block.modules() if isinstance(m, MoE)]
        inner = block.forward
        context = functools.partial(lambda ms: (contextlib.nullcontext(), _no_counting(ms)), moes)

        def forward(*args, _inner=inner, _context=context, _block=block):
            if not _block.training:
                return _inner(*args)
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=_context)

        block.forward = forward
    return len(blocks)
