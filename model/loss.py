"""Token cross-entropy of an output head, two ways.

Shapes: T tokens, D model dim, V vocab, C tokens per chunk.

``cross_entropy``: the reference. The head's logits (T, V) are materialized, then
F.cross_entropy in fp32. Autograd keeps the (T, V) logits and their log-softmax for backward:
at DeepSeek-V3's vocab (129,280) that is 0.5 MB per token in fp32, more than the rest of a
small model's activations together.

``chunked_linear_cross_entropy``: the head's GEMM and the loss fused, C tokens at a time. Each
chunk's logits are turned into their gradient (softmax - one-hot) while still in cache, and the
two backward GEMMs run right there: dh_c = G_c W, dW += G_c^T h_c. Only dh (T, D) and dW (V, D)
wait for backward, which scales them by the incoming gradient. The peak is one (C, V) chunk
instead of several (T, V) tensors; the FLOPs are the same three GEMMs. Gradients for an input
that does not need one are not computed (evaluation computes the loss only).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # h (T, D), weight (V, D), labels (T,)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T = h.shape[0]
        valid = labels != IGNORE_INDEX
        n_valid = valid.sum()
        safe_labels = labels.clamp_min(0)                 # ignored rows index class 0, masked below
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None
        for lo in range(0, T, chunk):
            hi = min(lo + chunk, T)
            h_c, y_c, ok = h[lo:hi], safe_labels[lo:hi], valid[lo:hi]
            logits = (h_c @ weight.t()).float()                              # (C, V)
            # log-sum-exp by hand, not torch.logsumexp, so that exp(logits - max) is computed
            # once, in place, and then becomes the softmax: about half the passes over (C, V)
            row_max = logits.amax(dim=-1, keepdim=True)                      # (C, 1)
            target = logits.gather(1, y_c.unsqueeze(1))                      # (C, 1)
            e = logits.sub_(row_max).exp_()                                  # (C, V)
            denom = e.sum(dim=-1, keepdim=True)                              # (C, 1)
            row_loss = (denom.log() + row_max - target).squeeze(1)           # (C,)
            loss_sum += torch.where(ok, row_loss, 0.0).sum()   # an ignored row never counts, even if non-finite
            if not (need_dh or need_dw):
                del logits, e
                continue
            # d(sum of row losses)/d logits = softmax - one_hot, zero on ignored rows
            okf = ok.to(e.dtype).unsqueeze(1)                                # (C, 1)
            grad = e.mul_(okf / denom)
            grad.scatter_add_(1, y_c.unsqueeze(1), -okf)
            grad = grad.to(h.dtype)
            if need_dh:
                torch.mm(grad, weight, out=dh[lo:hi])                        # (C, D)
            if need_dw:
                dw.addmm_(grad.t(), h_c)                                     # (V, D)
            del logits, e, grad      # free this chunk before the next one's GEMM allocates its own
        ctx.save_for_backward(dh, dw, n_valid)
        return loss_sum / n_valid            # nan when every label is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        dh, dw, n_valid = ctx.saved_tensors
        # the mean's 1/n and the incoming gradient, applied once to the accumulated sums
        scale = grad_loss / n_valid.clamp_min(1)
        return (dh * scale.to(dh.dtype) if dh is not None else None,
                dw * scale.to(dw.dtype) if dw is not None else None, None, None)


def chunked_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``labels`` without materializing the logits.

    h (..., D), weight (V, D), labels (...) with IGNORE_INDEX where no loss is wanted. Equal to
    ``cross_entropy(h @ weight.T, labels)`` up to fp32 rounding (tests/test_loss.py)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1 token")
    return _ChunkedLinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk)
