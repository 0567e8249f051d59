"""An emulated interconnect for benchmarks: a serial link with a bandwidth and a latency.

Each transfer is scheduled on a per-process link clock: it starts when both the caller has
issued it and the previous transfer has left the link, and it completes no sooner than
``latency + bytes / bandwidth`` later. ``wait`` first waits for the real collective, then
sleeps until the emulated completion time, so the CPU stays free for computation in the
meantime: exactly what lets overlap show on one machine. Off by default (bandwidth None).
"""
from __future__ import annotations

import time


class EmulatedLink:
    def __init__(self, bandwidth_gbps: float | None = None, latency_us: float = 0.0):
        self.bytes_per_s = None if bandwidth_gbps is None else bandwidth_gbps * 1e9 / 8
        self.latency_s = latency_us * 1e-6
        self.free_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.bytes_per_s is not None

    def schedule(self, nbytes: int) -> float:
        """Book a transfer of nbytes issued now; return the time it may complete."""
        if not self.enabled:
            return 0.0
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

    def block_until(self, t: float, real_wait=None) -> None:
        """Wait for the real collective (``real_wait()``), then for the emulated completion time;
        the whole wait counts as time blocked on the link."""
        t0 = time.perf_counter()
        if real_wait is not None:
            real_wait()
        self.wait_until(t)
        self.blocked_s += time.perf_counter() - t0
