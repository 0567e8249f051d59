"""The one timing helper of the benchmarks: wall time of a call, repeated, and of several variants
run side by side.

    from benchmarks.timing import alternate, cuda_sync, time_call

    t = time_call(step, repeats=10, warmup=3, sync=cuda_sync(device))
    t.median, t.best, t.seconds                    # seconds: one entry per timed repeat

    times = alternate({"ours": a, "theirs": b}, rounds=10, warmup=3)
    times["ours"].median / times["theirs"].median

``alternate`` runs the variants in turn, round after round (a, b, a, b, ...), so drift in the
machine's speed (other jobs, clocks, caches) hits all of them alike; a ratio of medians taken that
way is steadier than two runs one after the other. Warm-up calls are the same rounds, untimed.

``sync`` is called before the clock starts and again before it stops: ``cuda_sync(device)`` waits
for queued GPU work (a CUDA call returns before its kernels finish), ``torch.distributed.barrier``
lines ranks up so each repeat times the slowest. The peak FLOP/s MFU is taken against is not
measured here: ``parallel.metrics.peak.measure_peak_flops`` (what train.py uses).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class Timing:
    """Seconds of each timed repeat of one call, in order."""
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


def cuda_sync(device) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device, else None (CPU ops run synchronously)."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch

    return lambda: torch.cuda.synchronize(device)


def once(fn: Callable[[], object], sync: Callable[[], object] | None = None) -> float:
    """Seconds of one call of ``fn`` (``sync`` before the start and before the stop)."""
    if sync is not None:
        sync()
    t = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t


def alternate(fns: Mapping[K, Callable[[], object]], rounds: int, warmup: int = 0,
              sync: Callable[[], object] | None = None,
              between: Callable[[], object] | None = None) -> dict[K, Timing]:
    """Every variant of ``fns`` once per round, in the mapping's order: ``warmup`` untimed rounds,
    then ``rounds`` timed ones. ``between`` (if given) runs after each timed round, untimed (e.g.
    sampling something that drifts with the machine). -> {key: Timing}, keys as in ``fns``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: Timing() for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].seconds.append(once(fn, sync))
        if between is not None:
            between()
    return out


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1,
              sync: Callable[[], object] | None = None) -> Timing:
    """``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    return alternate({"": fn}, repeats, warmup, sync)[""]
