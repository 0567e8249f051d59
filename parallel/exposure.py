"""Exposed all-to-all time, measured inside a run: the wall time in which this rank computes nothing because
every one of its threads that is running a pipeline chunk is blocked in an expert-parallel exchange.

On a GPU the question "is the all-to-all hidden?" is whether the device idles while the exchange is in flight.
On a CPU rank the device is the rank's own compute threads: under DualPipeV's overlapped pairs
(parallel/pipeline/overlap.py) a forward chunk runs on a helper thread beside a backward chunk, so while one
side waits for its dispatch or combine the other may compute. The time is exposed only when *all* running
chunks wait at once. Measuring it this way, rather than as the step time with the emulated link minus the step
time without it, keeps it apart from what a shared machine adds: with more ranks than cores, a rank that sleeps
on the emulated link hands its core to another rank, and two threads of one rank contend for the same cores
when nothing waits, so the no-link baseline is not the compute time of the linked run.

Counted: the blocking count exchange and every wait of a dispatch or combine transfer (the real collective,
then the emulated link's remaining time), forward and backward. Not counted: waits outside a chunk (the
pipeline's own sends and receives between stages are the bubble, reported as ``pp_idle_fraction``).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ExposedWait:
    """Counts threads in chunks and threads blocked in an exchange, by kind ("collective": the real exchange,
    which also waits for the slowest peer; "link": the emulated link's remaining transfer time); accumulates the
    wall time in which every running chunk is blocked (``exposed_s``), and in which every one is on the link
    (``exposed_link_s``: the transfer time nothing hid, apart from waiting for peers)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._running = 0
        self._blocked = {"collective": 0, "link": 0}
        self._since = clock()
        self.exposed_s = self.exposed_link_s = 0.0

    def _change(self, running: int, kind: str | None = None, blocked: int = 0) -> None:
        with self._lock:
            now = self._clock()
            if self._running > 0 and sum(self._blocked.values()) >= self._running:
                self.exposed_s += now - self._since
                if self._blocked["link"] >= self._running:
                    self.exposed_link_s += now - self._since
            self._since = now
            self._running += running
            if kind is not None:
                self._blocked[kind] += blocked

    @contextmanager
    def chunk(self) -> Iterator[None]:
        """Around one forward or backward chunk (a thread starts computing)."""
        self._change(1)
        try:
            yield
        finally:
            self._change(-1)

    @contextmanager
    def blocked(self, kind: str = "collective") -> Iterator[None]:
        """Around one wait for an exchange (a computing thread stops until the data has arrived)."""
        if kind not in self._blocked:
            raise ValueError(f"ExposedWait.blocked: kind={kind!r}, must be one of {sorted(self._blocked)}")
        self._change(0, kind, 1)
        try:
            yield
        finally:
            self._change(0, kind, -1)

    def take(self) -> tuple[float, float]:
        """(exposed, exposed on the link) seconds since the last call (a wait in progress counts up to now)."""
        self._change(0)
        with self._lock:
            out = (self.exposed_s, self.exposed_link_s)
            self.exposed_s = self.exposed_link_s = 0.0
        return out
