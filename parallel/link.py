"""An emulated interconnect for benchmarks: a serial link with a bandwidth and a latency.

Each transfer is scheduled on a per-process link clock: it starts when both the caller has
issued it and the previous transfer has left the link, and it completes no sooner than
``latency + bytes / bandwidth`` later. ``wait`` first waits for the real collective, then
sleeps until the emulated completion time, so the CPU stays free for computation in the
meantime: exactly what lets overlap show on one machine. Off by default (bandwidth None).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.distributed as tdist


class EmulatedLink:
    def __init__(self, bandwidth_gbps: float | None = None, latency_us: float = 0.0):
        self.bytes_per_s = None if bandwidth_gbps is None else bandwidth_gbps * 1e9 / 8
        self.latency_s = latency_us * 1e-6
        self.free_at = 0.0
        self._lock = threading.Lock()   # DualPipeV's overlapped pairs book transfers from two threads

    @property
    def enabled(self) -> bool:
        return self.bytes_per_s is not None

    def schedule(self, nbytes: int) -> float:
        """Book a transfer of nbytes issued now; return the time it may complete."""
        if not self.enabled:
            return 0.0
        with self._lock:
            start = max(time.perf_counter(), self.free_at)
            self.free_at = start + self.latency_s + nbytes / self.bytes_per_s
            return self.free_at

    @staticmethod
    def wait_until(t: float) -> None:
        delay = t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


class WanLink(EmulatedLink):
    """The emulated wide-area link between sites, as one rank sees it, with the counters the
    metrics report: bytes this rank sent across sites and seconds it spent blocked waiting on
    that link. ``bandwidth_gbps`` is the whole site's uplink: its ``share`` ranks send at once
    (the outer exchange spreads over every rank of a site), so each one is booked at 1/share of
    it. ``latency_ms`` is paid once per transfer. Off (bandwidth None): only counts."""

    def __init__(self, bandwidth_gbps: float | None = None, latency_ms: float = 0.0, share: int = 1):
        super().__init__(None if bandwidth_gbps is None else bandwidth_gbps / share, latency_ms * 1e3)
        self.sent_bytes = 0
        self.blocked_s = 0.0

    def send(self, nbytes: int) -> float:
        """Count and book a transfer of nbytes issued now; return its emulated completion time."""
        self.sent_bytes += int(nbytes)
        return self.schedule(nbytes)

    def block_until(self, t: float, real_wait: Callable[[], object] | None = None) -> None:
        """Wait for the real collective (``real_wait()``), then for the emulated completion time;
        the whole wait counts as time blocked on the link."""
        t0 = time.perf_counter()
        if real_wait is not None:
            real_wait()
        self.wait_until(t)
        self.blocked_s += time.perf_counter() - t0


def emulate_wan_on_deepspeed(bandwidth_gbps: float, latency_ms: float, site_size: int) -> WanLink:
    """Benchmark only: put DeepSpeed's reductions (``deepspeed.comm`` all_reduce / reduce: ZeRO-0/1's
    gradient all-reduce, and the small overflow / norm reductions) of a run
    with no sites over the emulated wide-area link, as if ranks [s*site_size, (s+1)*site_size)
    were site s. Each call whose group spans S > 1 sites (m of its ranks in each) is booked as a
    hierarchical all-reduce: reduced inside the site, then each rank sends its 1/m share across,
    a ring's 2(S-1)/S of it, at 1/site_size of the site's uplink, plus the latency once; the call
    returns (or its handle's ``wait`` does) no sooner than the link allows. Parameter all-gathers
    are left off the link (a lower bound on synchronous data parallelism's time on it). Call
    before the engine steps (it patches the ``deepspeed.comm`` module); returns the link
    (counters: ``sent_bytes``, ``blocked_s``)."""
    import deepspeed.comm as ds_comm
    import torch.distributed as tdist

    link = WanLink(bandwidth_gbps, latency_ms, share=site_size)

    def crossing_bytes(tensor: torch.Tensor, group: tdist.ProcessGroup | None) -> int:
        ranks = tdist.get_process_group_ranks(group) if group is not None else range(tdist.get_world_size())
        per_site = {}
        for r in ranks:
            per_site[r // site_size] = per_site.get(r // site_size, 0) + 1
        S = len(per_site)
        if S < 2:
            return 0
        m = max(per_site.values())
        return 2 * (S - 1) * tensor.numel() * tensor.element_size() // (S * m)

    class _Delayed:
        def __init__(self, work: tdist.Work | None, done_at: float):
            self.work, self.done_at = work, done_at

        def wait(self, *a: Any, **k: Any) -> bool:
            link.block_until(self.done_at, lambda: self.work.wait(*a, **k) if self.work is not None else None)
            return True

        def __getattr__(self, name: str) -> Any:
            return getattr(self.work, name)

    def wrap(fn: Callable[..., Any], params: tuple[str, ...]) -> Callable[..., Any]:
        # deepspeed.comm's timed_op wrapper hides the signature (*args, **kwargs): name them here
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            a = {**dict(zip(params, args)), **kwargs}
            nbytes = crossing_bytes(a["tensor"], a.get("group"))
            done_at = link.send(nbytes) if nbytes else 0.0
            work = fn(*args, **kwargs)
            if not nbytes:
                return work
            if a.get("async_op"):
                return _Delayed(work, done_at)
            link.block_until(done_at)
            return work
        return wrapped

    for name, params in (("all_reduce", ("tensor", "op", "group", "async_op")),     # ZeRO-0/1's gradient
                         ("reduce", ("tensor", "dst", "op", "group", "async_op"))):  # paths (not ZeRO-2's
        setattr(ds_comm, name, wrap(getattr(ds_comm, name), params))                  # reduce-scatter)
    return link
