"""The schedule: torch.distributed.pipelining's stages and schedule objects for this rank.

One ``PipelineStage`` per stage this rank runs, over the pipe group (parallel/pipeline/groups.py),
with the shapes of what crosses each boundary given up front (no shape-inference pass, which would
run the MoE layers' all-to-alls outside the schedule). Schedules: ``Schedule1F1B`` (one stage per
rank), ``ScheduleInterleaved1F1B`` (two looped stages per rank), ``ScheduleDualPipeV`` (two stages
per rank in a V: rank r runs stages r and 2P-1-r; its paired forward/backward steps are
``OVERLAP_F_B`` actions). ``scale_grads=False``: the loss function and the aux-loss gradient are
already divided by the micro-batch count, as DeepSpeed's ``engine.backward`` divides by
``gradient_accumulation_steps`` at pp=1, so the gradients are formed in the same order and scale.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B

from parallel.pipeline.stages import StageModule

SCHEDULE_CLASSES = {"1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B, "dualpipev": ScheduleDualPipeV}


def boundary_shapes(mbs: int, seq: int, hidden: int, depths: int, dtype: torch.dtype, first: bool,
                    device: torch.device) -> tuple[torch.Tensor, ...]:
    """Example tensors of one micro-batch entering a stage: the token ids (and MTP next tokens) for the first,
    else the hidden states and one embedding per MTP depth (all (mbs, seq, hidden))."""
    if first:
        ids = torch.zeros(mbs, seq, dtype=torch.long, device=device)
        return (ids, torch.zeros(mbs, seq, depths, dtype=torch.long, device=device)) if depths else (ids,)
    # requires_grad: the stage then sends the gradient of what it received back to the previous one
    return tuple(torch.empty(mbs, seq, hidden, dtype=dtype, device=device, requires_grad=True)
                 for _ in range(1 + depths))


def build_schedule(modules: list[StageModule], n_stages: int, schedule: str, micro_batches: int, mbs: int,
                   seq: int, dtype: torch.dtype, device: torch.device, pipe_group: Any,
                   loss_fn: Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]) -> Any:
    """-> the schedule object whose ``step(*inputs, target=labels)`` runs one optimizer step's micro-batches."""
    stages = []
    for m in modules:
        hidden, depths = m.hidden, m.depths
        inputs = boundary_shapes(mbs, seq, hidden, depths, dtype, m.first, device)
        outputs = boundary_shapes(mbs, seq, hidden, depths, dtype, False, device)
        stages.append(PipelineStage(m, m.index, n_stages, device, input_args=inputs, output_args=outputs,
                                    group=pipe_group))
    cls = SCHEDULE_CLASSES[schedule]
    if schedule == "1f1b":
        return cls(stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)
