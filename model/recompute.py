"""Activation checkpointing of decoder blocks that keeps the routed-token counts exact.

Each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant). Its
recomputation in backward would route the same tokens a second time, so the recompute
context switches ``count_tokens`` off on the block's MoE modules: the balancing counts
are the same with and without checkpointing.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.moe import MoE

if TYPE_CHECKING:
    from model.transformer import DeepseekV3


@contextlib.contextmanager
def _no_counting(moes: list[MoE]) -> Iterator[None]:
    saved = [m.count_tokens for m in moes]
    for m in moes:
        m.count_tokens = False
    try:
        yield
    finally:
        for m, s in zip(moes, saved):
            m.count_tokens = s


def apply_activation_checkpointing(model: DeepseekV3) -> int:
    """Wrap every decoder block (main stack and MTP) of a DeepseekV3; returns how many."""
    blocks = list(model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        moes = [m for m in block.modules() if isinstance(m, MoE)]
        inner = block.forward
        context = functools.partial(lambda ms: (contextlib.nullcontext(), _no_counting(ms)), moes)

        def forward(*args: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                    _inner: Callable[..., tuple[torch.Tensor, torch.Tensor]] = inner,
                    _context: Callable[[], Any] = context,
                    _block: nn.Module = block) -> tuple[torch.Tensor, torch.Tensor]:
            if not _block.training:
                return _inner(*args)
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=_context)

        block.forward = forward
    return len(blocks)
