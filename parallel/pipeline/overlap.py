"""DualPipeV's paired forward and backward, overlapped (``parallel.pp_overlap``, on by default).

In the steady phase ScheduleDualPipeV issues ``OVERLAP_F_B`` actions: the forward chunk of one micro-batch on
one of the rank's stages and the backward chunk of another micro-batch on its other stage. torch runs the
two in turn; here they run at the same time, the forward on a helper thread and the backward's input
gradients on the schedule's thread, then the backward's weight gradients (``overlapped_pair``). Each side's
expert-parallel all-to-alls (parallel/expert/dispatcher.py: asynchronous, their completion waited for where
the data is needed) then leave the CPU/GPU to the other side's compute while they are in flight: DeepSeek's
DualPipe pairing, with the interleaving left to the two threads instead of hand-cut pieces (attention,
dispatch, MLP, combine).

Collectives must meet in the same order on every rank of a group. The two sides of a pair always run
different stages, so each of the rank's two stages gets its own copy of its EP group (same ranks, another
communicator): within a stage the order of all-to-alls is the schedule's, the same on every EP rank.
What each side computes is unchanged, so the results are those of the sequential pair.
"""
from __future__ import annotations

import threading
from typing import Any

import torch.distributed as dist
from torch import nn

from model.moe import MoE


def own_ep_group(module: nn.Module, ep: int, stage_size: int, pp: int) -> None:
    """Collective (every rank, once): give the MoE layers of ``module`` (this rank's second stage) a copy of
    their EP group, created for every EP group of the world in the same order."""
    me, mine = dist.get_rank(), None
    for block in range(pp):
        for g in range(stage_size // ep):
            ranks = [block * stage_size + g * ep + i for i in range(ep)]
            group = dist.new_group(ranks)
            if me in ranks:
                mine = group
    for m in module.modules():
        if isinstance(m, MoE) and hasattr(m.dispatcher, "group"):
            m.dispatcher.group = mine


def overlapped_pair(run_action: Any) -> Any:
    """-> the OVERLAP_F_B custom function: ``run_action(sub_action, ctx[, defer_weight])`` runs one sub-action
    as the schedule would; the forward sub-action on a thread beside the backward's input-gradient part here,
    both joined, then the backward's weight-gradient part.

    Why the weight gradients wait: a backward chunk computes about twice a forward chunk, with the same
    all-to-alls. Run whole beside the forward, it goes on alone once the forward is done, and its remaining
    dispatch and combine waits have nothing to hide behind. Its input-gradient part holds every all-to-all and
    about the forward's compute, so the two sides' exchanges hide behind each other's compute; the weight
    gradients (local GEMMs, no exchange) then run alone and expose nothing. DeepSeek's DualPipe splits the
    backward the same way (the W in its bubble formula)."""
    def pair(action: Any, ctx: Any) -> None:
        forward, backward = action.sub_actions
        errors: list[BaseException] = []

        def run_forward() -> None:
            try:
                run_action(forward, ctx)
            except BaseException as e:   # re-raised on the schedule's thread
                errors.append(e)

        worker = threading.Thread(target=run_forward, name="pp-overlap-forward")
        worker.start()
        try:
            weight_part = run_action(backward, ctx, True)
        finally:
            worker.join()
        if errors:
            raise errors[0]
        if weight_part is not None:
            weight_part()
    return pair
