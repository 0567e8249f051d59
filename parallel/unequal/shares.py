"""Per-rank shares of the global batch, for ranks of unequal speed (``parallel.rank_capacity``).

    B   = train.micro_batch_size x train.grad_accum x W   rows per optimizer step (as with equal shares)
    n_r = rank r's rows: proportional to its capacity c_r, a whole multiple of G = train.grad_accum
    m_r = n_r / G                                           rank r's micro-batch size

Every rank runs the same G micro-steps: the expert all-to-all (every MoE layer, every micro-step)
and ZeRO's gradient reduction are collectives that all ranks enter, so a slow rank gets smaller
micro-batches, not fewer of them. The sampler (data/sampler.py) hands rank r the n_r rows after
those of ranks 0..r-1 of the same global batch: the data order, and the one visit of every row per
epoch, do not depend on the shares.

Loss weight. DeepSpeed averages gradients over the W data-parallel ranks, g = (1/W) sum_r grad L_r,
with L_r the mean loss over rank r's n_r rows (each micro-loss divided by G). Scaling L_r by
w_r = W n_r / B gives g = (1/B) sum over all B rows of grad l_i: the gradient of the global mean,
which is what the equal split computes (w_r = 1 there). Expert gradients reach their EP rank through
the all-to-all's backward carrying their source rank's weight, so the identity holds for them too,
and ZeRO's equal averaging stays correct. The router's token counts do not depend on the split.

``auto``: the shares start equal; each rank's compute time per step (parallel/unequal/clock.py) is
measured over ``parallel.capacity_probe_steps`` steps (the first, with its warm-up, is dropped), the
capacities are set to rows per compute-second of the median step (a step still warming up, as the
second after a resume often is, or a hiccup does not move them), and the shares are fixed from then
on. They go into the checkpoint, so a resume continues with the same shares (and
``expert_placement=capacity`` can place experts by them at that resume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from configs.schema import Config
    from data.sampler import ShardedSampler


def check_capacity(cfg: Config, world_size: int) -> None:
    """Checks of the mixed-hardware fields that need the world size: before any process group."""
    p, t = cfg.parallel, cfg.train
    caps = p.rank_capacity
    if isinstance(caps, list):
        if len(caps) != world_size:
            raise ValueError(f"parallel.rank_capacity has {len(caps)} entries ({caps}); the world has "
                             f"{world_size} ranks: give one capacity per rank")
        apportion(t.micro_batch_size * t.grad_accum * world_size, caps, t.grad_accum)   # raises if too small
    if caps is not None and p.sites > 1:
        raise ValueError(f"parallel.rank_capacity={caps!r} with parallel.sites={p.sites}: unequal shares are "
                         "not supported across sites yet (sites must stay identical for the outer step)")
    if p.expert_placement == "load" and p.sites > 1:
        raise ValueError(f"parallel.expert_placement=load with parallel.sites={p.sites}: a load placement can give a "
                         "rank several separate pieces of one expert tensor, which the outer step does not "
                         "exchange yet; use even or capacity across sites")
    for r in (p.emulate_slowdown or {}):
        if r >= world_size:
            raise ValueError(f"parallel.emulate_slowdown: rank {r} does not exist (world size {world_size})")


def apportion(total_rows: int, capacities: list[float], unit: int, strict: bool = True) -> list[int]:
    """Split ``total_rows`` (a multiple of ``unit``) over ranks in proportion to ``capacities``, in
    whole units (largest remainder; ties go to the lower rank). ``strict``: a rank whose share is
    under one unit is an error naming its capacity; otherwise it is raised to one unit (taken from
    the largest shares), as ``auto`` does with a measured capacity."""
    units = total_rows // unit
    total = float(sum(capacities))
    quota = [units * c / total for c in capacities]
    got = [math.floor(q) for q in quota]
    order = sorted(range(len(quota)), key=lambda r: (-(quota[r] - got[r]), r))
    for r in order[:units - sum(got)]:
        got[r] += 1
    for r, n in enumerate(got):
        if n >= 1:
            continue
        if strict:
            raise ValueError(
                f"parallel.rank_capacity[{r}]={capacities[r]}: rank {r}'s share of the global batch of "
                f"{total_rows} rows is {total_rows * capacities[r] / total:.2f} rows, less than one full "
                f"micro-batch of one row per micro-step (train.grad_accum={unit}); raise its capacity, "
                "train.micro_batch_size or train.grad_accum")
        if units < len(got):
            raise ValueError(f"{total_rows} rows cannot give each of {len(got)} ranks one row per micro-step")
        got[max(range(len(got)), key=lambda i: (got[i], -i))] -= 1
        got[r] = 1
    return [n * unit for n in got]


@dataclass
class Shares:
    rows: list[int]          # rows per step of every rank, summing to the global batch
    grad_accum: int
    measured: bool = False   # fixed by auto's probe (else: configured or equal)

    @property
    def global_rows(self) -> int:
        return sum(self.rows)

    def micro(self, rank: int) -> int:
        """Rank ``rank``'s micro-batch size."""
        return self.rows[rank] // self.grad_accum

    def weight(self, rank: int) -> float:
        """w_r = W n_r / B: the factor on rank r's mean loss that makes the update the equal split's."""
        return len(self.rows) * self.rows[rank] / self.global_rows

    def fractions(self) -> list[float]:
        return [n / self.global_rows for n in self.rows]

    def adopt(self, other: Shares) -> None:
        """Take ``other``'s rows in place (the sampler, the metrics and the checkpoint hold this object)."""
        self.rows, self.grad_accum, self.measured = list(other.rows), other.grad_accum, other.measured

    def state_dict(self) -> dict:
        """Saved with the checkpoint; restored when the run is built (``initial_shares``), since the
        expert placement and the sampler need the shares before the model exists."""
        return {"rows": list(self.rows), "grad_accum": self.grad_accum, "measured": self.measured}


def initial_shares(cfg: Config, world_size: int, saved: dict | None = None) -> Shares:
    """The shares a run starts with: a resumed run's saved ones when it had them from ``auto``'s
    probe (or the same configured list); else the configured capacities, else equal."""
    t, caps = cfg.train, cfg.parallel.rank_capacity
    total = t.micro_batch_size * t.grad_accum * world_size
    if (caps == "auto" and saved and saved.get("measured") and len(saved["rows"]) == world_size
            and sum(saved["rows"]) == total and saved.get("grad_accum") == t.grad_accum):
        return Shares(list(saved["rows"]), t.grad_accum, measured=True)
    if isinstance(caps, list):
        return Shares(apportion(total, caps, t.grad_accum), t.grad_accum)
    return Shares([total // world_size] * world_size, t.grad_accum)


def measured_shares(rows: int, busy_s: float, shares: Shares, device: torch.device) -> tuple[Shares, list[float]]:
    """auto's probe result (collective over the world): every rank's rows per compute-second ->
    (the new shares, the capacities normalised to the fastest rank = 1)."""
    speed = torch.tensor([rows / max(busy_s, 1e-9)], dtype=torch.float64, device=device)
    all_speeds = [torch.zeros_like(speed) for _ in range(dist.get_world_size())]
    dist.all_gather(all_speeds, speed)
    caps = [float(s) for s in all_speeds]
    top = max(caps)
    caps = [c / top for c in caps]
    return Shares(apportion(shares.global_rows, caps, shares.grad_accum, strict=False), shares.grad_accum,
                  measured=True), caps


class CapacityProbe:
    """``parallel.rank_capacity: auto``: the compute seconds of this launch's steps 2..capacity_probe_steps
    (step 1 warms up) and, at the last of them, the shares fixed from their median (one step still
    warming up, as the second after a resume often is, or a hiccup does not move them)."""

    def __init__(self, cfg: Config, shares: Shares, sampler: ShardedSampler, rank: int, start_step: int,
                 device: torch.device):
        self.active = cfg.parallel.rank_capacity == "auto" and not shares.measured
        self.steps = cfg.parallel.capacity_probe_steps
        self.shares, self.sampler, self.rank, self.start, self.device = shares, sampler, rank, start_step, device
        self.busy: list[float] = []

    def after_step(self, step: int, busy_s: float) -> str | None:
        """Collective at the probe's last step; -> a line for the log when the shares were set."""
        if not self.active:
            return None
        if step - self.start > 1:
            self.busy.append(busy_s)
        if step - self.start < self.steps:
            return None
        import statistics

        measured, caps = measured_shares(self.shares.rows[self.rank], statistics.median(self.busy), self.shares,
                                         self.device)
        self.shares.adopt(measured)
        self.sampler.set_shares(self.shares.rows)
        self.active = False
        return (f"auto capacity after step {step}: relative speeds {[round(c, 3) for c in caps]} "
                f"-> rows per step by rank {self.shares.rows}")

