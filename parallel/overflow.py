"""A non-finite gradient found with one host read per optimizer step, in DeepSpeed's ZeRO-1/2 step.

A GPU step runs ahead of the host until the host needs a value the device computes. DeepSpeed
0.19.8's ZeRO step (``DeepSpeedZeroOptimizer.step``) reads the gradients back 2 + P times (P the
parameter groups: 2, 3 with expert parallelism):

1. the overflow pass (``check_overflow``): every gradient's amax/amin, a flag all-reduced over the
   data-parallel ranks, ``.item()``. The trainer turns ``check_grad_overflow`` on (engine.py): in
   bf16 DeepSpeed tests neither the gradients nor the norm without it, and applies a NaN step;
2. ``is_invalid_grad_norm(global norm)``, a ``bool`` of the norm clipping uses (in bf16 only with
   ``check_grad_overflow``);
3. once per parameter group, ``unscale_and_clip_grads`` asks the same of the same norm again,
   to replace an invalid one by inf before dividing by it.

The global norm is computed every step (ZeRO's ``compute_grad_norm``, on unless turned off;
clipping needs it) from the same gradients the overflow pass reads, and a NaN/inf anywhere makes it
NaN/inf (DeepSpeed maps both to an invalid norm), so read 2 alone can decide the step.
``one_overflow_read`` keeps it and drops the others: the overflow pass becomes a no-op; the norm's
invalidity is shared over the data-parallel ranks by an all-reduce on the device (the pass was
global, but an expert group's norm is reduced only over that expert's data-parallel ranks: without
this a rank-local expert NaN would skip the step on one rank only); clipping replaces an invalid
norm on the device (``torch.where``) instead of asking the host. Valid norms pass unchanged, so
parameters, norms and checkpoints are bit-identical to DeepSpeed's own step.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _invalid(norm: torch.Tensor) -> torch.Tensor:
    """True where the norm is NaN, inf or DeepSpeed's -1 sentinel for one; on the device."""
    return ~torch.isfinite(norm) | (norm < 0)


def one_overflow_read(opt: Any) -> bool:
    """Rewire a ZeRO-1/2 optimizer (engine.optimizer) so that its step reads the device once (see the
    module doc). Only where the norm is computed every step and gradients stay on the device (no
    ZeRO-Offload); elsewhere the overflow pass stays. -> whether it was rewired."""
    if not (getattr(opt, "compute_grad_norm", False) and getattr(opt, "check_grad_overflow", False)
            and not getattr(opt, "cpu_offload", True) and hasattr(opt, "scaled_global_norm")
            and hasattr(opt, "unscale_and_clip_grads")):
        return False
    global_norm = opt.scaled_global_norm

    def norm_invalid_everywhere(*args: Any, **kwargs: Any) -> torch.Tensor:
        norm = global_norm(*args, **kwargs)
        bad = _invalid(norm).to(torch.uint8)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=opt.dp_process_group)
        opt._model_parallel_all_reduce(tensor=bad, op=dist.ReduceOp.MAX)
        return torch.where(bad.bool(), torch.full_like(norm, float("inf")), norm)

    def clip_on_device(grad_groups_flat: list, total_norm: torch.Tensor | float) -> None:
        """DeepSpeed's unscale_and_clip_grads with the invalid-norm test done by torch.where."""
        if opt.clip_grad == 0.0 and opt.loss_scale == 1.0:
            return
        scale = opt.loss_scale
        if opt.clip_grad > 0.0:
            norm = total_norm if torch.is_tensor(total_norm) else torch.tensor(float(total_norm), device=opt.device)
            norm = torch.where(_invalid(norm), torch.full_like(norm, float("inf")), norm)
            # norm / loss scale is the true norm; the factor divides by max(1, true norm / clip)
            scale = torch.clamp(((norm / opt.loss_scale) + 1e-6) / opt.clip_grad, min=1.0) * opt.loss_scale
        for grads in grad_groups_flat:
            for g in grads if isinstance(grads, list) else [grads]:
                g.data.mul_(1.0 / scale)

    opt.check_overflow = lambda partition_gradients=True: None   # read 2 decides (opt.overflow stays False)
    opt.scaled_global_norm = norm_invalid_everywhere
    opt.unscale_and_clip_grads = clip_on_device
    return True
