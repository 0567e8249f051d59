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

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B
from torch.distributed.pipelining._utils import _make_tensor_from_meta

from parallel.exposure import ExposedWait
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
    """-> (the schedule object whose ``step(*inputs, target=labels)`` runs one optimizer step's micro-batches,
    this rank's PipelineStage objects)."""
    stages = []
    for m in modules:
        hidden, depths = m.hidden, m.depths
        inputs = boundary_shapes(mbs, seq, hidden, depths, dtype, m.first, device)
        outputs = boundary_shapes(mbs, seq, hidden, depths, dtype, False, device)
        stages.append(PipelineStage(m, m.index, n_stages, device, input_args=inputs, output_args=outputs,
                                    group=pipe_group))
    cls = SCHEDULE_CLASSES[schedule]
    sched = cls(stages[0] if schedule == "1f1b" else stages, micro_batches, loss_fn=loss_fn, scale_grads=False)
    release_receives(stages, sched._internal_losses)
    return sched, stages


def release_receives(stages: list[PipelineStage], losses: list[torch.Tensor]) -> None:
    """torch allocates a receive buffer for every micro-batch's stage input and output gradient in the first
    step and keeps all M of them, each way, from step to step (and at a V's turn, stages s and s + 1 on one
    rank, it parks s's output and s + 1's input gradient in the same records until the next step replaces
    them). A micro-batch needs its two only from the receive (or hand-over) to the end of its backward's
    input half: allocate them when the receive is posted, drop them after that backward. What a stage holds
    between steps falls from 2M boundary tensors per stage to none, and inside a step to the micro-batches
    in flight (benchmarks/results/pipeline.md, memory plan). The weight half keeps its own references.
    ``losses``: the schedule's own list of the last stage's per-micro-batch losses, kept to the step's end; a
    loss's graph holds its stage inputs (the leaves' AccumulateGrad nodes) after its backward ran, so it is
    detached once its backward has run (the trainer reads its loss parts from the loss function instead)."""
    for st in stages:
        st._setup_forward_recv_info = _unallocated(st._setup_forward_recv_info, st.args_recv_info)
        st._setup_backward_recv_info = _unallocated(st._setup_backward_recv_info, st.grad_recv_info)
        st.get_fwd_recv_ops = _allocating(st.get_fwd_recv_ops, st.args_recv_info, st.device)
        st.get_bwd_recv_ops = _allocating(st.get_bwd_recv_ops, st.grad_recv_info, st.device)
        st.backward_one_chunk = _releasing(st.backward_one_chunk, st, losses if st.is_last else [])


def _unallocated(setup: Callable, records: dict[int, tuple]) -> Callable:
    """torch's set-up of the receive records (first step), with their M buffers left unallocated."""
    def run(*args: Any, **kwargs: Any) -> Any:
        out = setup(*args, **kwargs)
        for infos in records.values():
            for info in infos:
                if not info.is_root_arg:
                    info.buffer = None
        return out
    return run


def _allocating(get_recv_ops: Callable, records: dict[int, tuple], device: torch.device) -> Callable:
    def run(mb: int) -> Any:
        for info in records.get(mb, ()):
            if info.buffer is None and info.tensor_meta is not None and not info.is_root_arg:
                info.buffer = _make_tensor_from_meta(info.tensor_meta, device)   # as torch's set-up makes it
        return get_recv_ops(mb)
    return run


def _releasing(backward: Callable, stage: PipelineStage, losses: list[torch.Tensor]) -> Callable:
    def run(mb: int, *args: Any, **kwargs: Any) -> Any:
        out = backward(mb, *args, **kwargs)
        for info in stage.args_recv_info.get(mb, ()) + stage.grad_recv_info.get(mb, ()):
            if not info.is_root_arg:
                info.buffer = None
        if mb < len(losses):
            losses[mb] = losses[mb].detach()
        return out
    return run


class StageClock:
    """Seconds this rank computes (forward, backward, weight-gradient chunks) and bytes it sends to other
    ranks across stage boundaries, by wrapping the stages' chunk methods: the rest of a schedule step is
    pipeline idle time (the bubble, and waiting for a neighbour's activations or gradients).
    ``boundary_bytes``: one micro-batch's tensors across a boundary (the same each way)."""

    def __init__(self, stages: list[Any], my_rank: int, boundary_bytes: int):
        self.busy_s, self.sent_bytes = 0.0, 0
        self.exposed = ExposedWait()     # the chunks' expert-parallel waits that no other chunk hides
        self._active, self._since, self._lock = 0, 0.0, threading.Lock()   # overlapped chunks count once
        for st in stages:
            for name, step in (("forward_one_chunk", 1), ("backward_one_chunk", -1), ("backward_weight_one_chunk", 0)):
                neighbour = st.stage_index + step
                crosses = step != 0 and 0 <= neighbour < st.num_stages and \
                    st.stage_index_to_group_rank[neighbour] != my_rank
                setattr(st, name, self._timed(getattr(st, name), boundary_bytes if crosses else 0))

    def _timed(self, fn: Callable, sends: int) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._active += 1
                if self._active == 1:
                    self._since = time.perf_counter()
            try:
                with self.exposed.chunk():
                    return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._active -= 1
                    if self._active == 0:
                        self.busy_s += time.perf_counter() - self._since
                    self.sent_bytes += sends
        return run


def run_sub_action(action: Any, ctx: Any, defer_weight: bool = False) -> Callable[[], None] | None:
    """One FORWARD or FULL_BACKWARD sub-action of an OVERLAP_F_B pair, as torch's _PipelineScheduleRuntime runs
    it (torch 2.13, schedules.py: wait for the received input, compute, the loss on the last stage, the hand-over
    to an adjacent stage on this rank at the V's turn); the sends are the schedule's own later actions.
    ``defer_weight``: a backward computes the input gradients only (every all-to-all of the backward is on
    their path) and returns the weight-gradient part (local GEMMs, no communication) to be run later; the first
    stage has no input gradient to split off (torch runs its whole backward in the weight part), so it runs in
    full here. -> that deferred part, or None."""
    from torch.distributed.pipelining.schedules import FORWARD, _wait_batch_p2p

    sched = ctx.schedule_ref
    stages = {st.stage_index: st for st in sched._stages}
    i, mb = action.stage_index, action.microbatch_index
    stage = stages[i]
    if action.computation_type == FORWARD:
        if not stage.is_first and i - 1 not in stages:
            _wait_batch_p2p(sched.fwd_recv_ops.pop((i, mb)))
        output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=False)
        sched._maybe_compute_loss(stage, output, ctx.target_mbs, mb, None)
        if i + 1 in stages:
            stages[i + 1].set_local_fwd_input(output, mb)
        return None
    if not stage.is_last and i + 1 not in stages:
        _wait_batch_p2p(sched.bwd_recv_ops.pop((i, mb)))
    loss = sched._maybe_get_loss(stage, mb)
    sched.backward_counter[i] += 1
    last = sched.backward_counter[i] == sched._n_microbatches
    split = defer_weight and not stage.is_first
    stage.backward_one_chunk(mb, loss=loss, full_backward=not split, last_backward=last)
    if i - 1 in stages:
        stages[i - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)
    return (lambda: stage.backward_weight_one_chunk(mb, last_backward=last)) if split else None
