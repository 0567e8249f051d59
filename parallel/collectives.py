"""The small collectives the training loop runs: means for the log, the per-step agreement on
stopping and skipping, and per-rank step times. Every rank calls each of them at the same point."""
from __future__ import annotations

import torch
import torch.distributed as dist


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The element-wise mean of ``values`` over all ranks (one all-reduce; none on one rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def gather_rank_times(times: torch.Tensor, device: torch.device) -> list[list[float]]:
    """(3,) this rank's seconds per step (wall, busy, wait) -> [[wall by rank], [busy..], [wait..]]."""
    parts = [torch.zeros(3, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, times.to(device))
    return [[round(float(p[i]), 6) for p in parts] for i in range(3)]


def agree_on_step(stop_requested: bool, skipped: bool, device: torch.device,
                  site_group: dist.ProcessGroup | None = None) -> tuple[bool, bool, bool]:
    """One all-reduce per step: stop if any rank was asked to; and check that every rank made the
    same skip decision (DeepSpeed all-reduces the overflow flag, so a mismatch is a bug). With
    sites, a skip is a site's own decision (its ZeRO group reduced the flag), while the stop and
    whether any site skipped (which logs the step, a collective) are the world's.
    -> (stop, this rank skipped, some rank skipped)"""
    flags = torch.tensor([float(stop_requested), float(skipped), -float(skipped)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=site_group)
    if site_group is not None:   # every site saves, stops and logs at the same step
        world = flags[:2].clone()
        dist.all_reduce(world, op=dist.ReduceOp.MAX)
        flags = torch.cat([flags, world])
    values = flags.tolist()      # the one host read of the step's agreement
    stop, any_skipped, not_all = bool(values[0]), bool(values[1]), values[2] == 0
    if any_skipped and not_all:
        raise RuntimeError("ranks disagree on whether the optimizer step was skipped")
    if site_group is None:
        return stop, any_skipped, any_skipped
    return bool(values[3]), any_skipped, bool(values[4])
