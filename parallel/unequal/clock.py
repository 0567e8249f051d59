"""Where each rank's step time goes: its own compute, or waiting for the others.

    busy = forward + backward of every micro-step, minus the time blocked in the expert
           all-to-alls (the dispatchers' waits), up to the start of DeepSpeed's gradient reduction
    wait = the step's wall time - busy   (all-to-all waits, gradient reduction, ZeRO's step)

A rank that holds the job back has busy close to its step time; the ranks it holds back show the
difference as wait. ``auto`` shares (parallel/unequal/shares.py) are set from busy time, and the metrics
record both per rank.

The clock is read at every point where this rank may start waiting for the others: before each
blocking exchange of the expert dispatchers (their ``on_sync`` hook) and at the engine's
``allreduce_gradients``, which DeepSpeed calls at the end of every backward (ZeRO-1 and stage 0
reduce there at the accumulation boundary). Under ZeRO-2 gradient buckets are also reduced from
hooks during the backward, so a wait inside those counts as busy. On CUDA the clock synchronises
the device at these points, so kernel time is counted where it runs; NCCL's all-to-all waits are
then device-side and count as compute (a known limit: ``auto`` on GPUs with EP sees a waiting rank
as slower).

Slowdown emulation (``parallel.emulate_slowdown: {rank: factor}``, tests and benchmarks only): at
each of those points the rank sleeps (factor - 1) x the compute since the previous one, as a device
that many times slower would still be computing. Spreading the sleep over the sync points matters:
ranks meet at every MoE layer's all-to-all, so a rank that slept once at the end of the step would
let the others wait layer by layer for nothing it computes. The sleep counts as busy; per
micro-step it totals (factor - 1) x the micro-step's compute.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from parallel.expert.dispatcher import AllToAllDispatcher
    from parallel.metrics.record import StepStats
    from parallel.unequal.shares import Shares


def dispatcher_wait_s(dispatchers: list[AllToAllDispatcher]) -> float:
    """Seconds this rank spent blocked in the expert all-to-alls so far."""
    return sum(getattr(d, "wait_s", 0.0) for d in dispatchers)


class RankClock:
    def __init__(self, engine: DeepSpeedEngine, dispatchers: list[AllToAllDispatcher], slowdown: float = 1.0,
                 device: torch.device | None = None):
        self.dispatchers, self.slowdown = dispatchers, slowdown
        self._cuda = device is not None and device.type == "cuda"
        # whether this step's times are used (auto's probe, the slowdown emulation): only then does
        # the clock synchronise the device at its points; elsewhere a sync per all-to-all wait would
        # serialise the overlap, and on a CPU every op has finished when it returns anyway
        self.measuring: Callable[[], bool] = lambda: True
        self._measured = True
        self._reduce_gradients = engine.allreduce_gradients
        engine.allreduce_gradients = self._at_reduction         # instance attribute: engine.backward calls it
        for d in dispatchers:
            d.on_sync = self.sync_point
        self.busy_s = 0.0                                         # this step so far
        self._open = False

    def _sync(self) -> None:
        if self._cuda and self._measured:
            torch.cuda.synchronize()

    def micro_start(self) -> None:
        self._measured = self.measuring()     # fixed for the micro-step
        self._sync()
        self._t0, self._w0, self._open = time.perf_counter(), dispatcher_wait_s(self.dispatchers), True

    def sync_point(self) -> None:
        """This rank may wait from here: book its compute since the last point (and sleep, if slowed)."""
        if not self._open:
            return
        self._sync()
        busy = time.perf_counter() - self._t0 - (dispatcher_wait_s(self.dispatchers) - self._w0)
        if self.slowdown > 1.0:
            nap = (self.slowdown - 1.0) * busy
            time.sleep(nap)
            busy += nap
        self.busy_s += busy
        self._t0, self._w0 = time.perf_counter(), dispatcher_wait_s(self.dispatchers)

    def _at_reduction(self, *args: Any, **kwargs: Any) -> Any:
        self.micro_end()             # the backward's own compute ends here; the reduction is waiting
        return self._reduce_gradients(*args, **kwargs)

    def micro_end(self) -> None:
        """After engine.backward (or at its reduction): closes the micro-step."""
        self.sync_point()
        self._open = False

    def step_end(self, step_s: float) -> tuple[float, float]:
        """-> (busy, wait) seconds of the step that took ``step_s`` on this rank; resets."""
        busy = self.busy_s
        self.busy_s = 0.0
        return busy, max(0.0, step_s - busy)


class RankTimes:
    """Each rank's seconds per step since the last record (wall, own compute, waiting for the others),
    gathered for the metrics record: which rank holds the job back, and its share of the batch."""

    def __init__(self, shares: Shares, device: torch.device, start_step: int):
        self.shares, self.device = shares, device
        self.sums = torch.zeros(3, dtype=torch.float64)          # wall, busy, wait seconds
        self.since = start_step

    def add(self, seconds: float, busy_s: float, wait_s: float) -> None:
        self.sums += torch.tensor([seconds, busy_s, wait_s], dtype=torch.float64)

    def fields(self, s: StepStats) -> dict:
        """Metrics fields (parallel/metrics/record.py); a collective over the world when it has several ranks."""
        import torch.distributed as dist

        from parallel.collectives import gather_rank_times

        out = {}
        if dist.get_world_size() > 1:
            per_rank = gather_rank_times(self.sums / max(1, s.step - self.since), self.device)
            out = dict(rank_step_s=per_rank[0], rank_busy_s=per_rank[1], rank_wait_s=per_rank[2],
                       rank_share=[round(f, 6) for f in self.shares.fractions()])
        self.sums.zero_()
        self.since = s.step
        return out
