"""The emulated interconnect's schedule, on a fake clock (no real time is measured): a serial
link on which each transfer takes latency + bytes / bandwidth, starting when it is issued or
when the previous transfer has left the link, whichever is later."""
from __future__ import annotations

import pytest

import parallel.link as link_mod
from parallel.link import EmulatedLink


class FakeClock:
    def __init__(self):
        self.now, self.slept = 100.0, []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(link_mod.time, "perf_counter", c.perf_counter)
    monkeypatch.setattr(link_mod.time, "sleep", c.sleep)
    return c


def test_off_by_default_never_waits(clock):
    link = EmulatedLink()
    assert not link.enabled
    assert link.schedule(10 ** 9) == 0.0
    link.wait_until(link.schedule(10 ** 9))
    assert clock.slept == []


def test_transfers_are_serial_with_latency_and_bandwidth(clock):
    link = EmulatedLink(bandwidth_gbps=8.0, latency_us=50.0)      # 1e9 bytes/s
    a = link.schedule(2_000_000)                                   # 50 us + 2 ms
    assert a == pytest.approx(100.0 + 50e-6 + 2e-3)
    b = link.schedule(1_000_000)                                   # queued behind a on the link
    assert b == pytest.approx(a + 50e-6 + 1e-3)
    clock.now += 1.0                                               # link idle again: starts now
    c = link.schedule(0)
    assert c == pytest.approx(clock.now + 50e-6)


def test_wait_sleeps_only_the_remaining_time(clock):
    link = EmulatedLink(bandwidth_gbps=8.0)
    done = link.schedule(4_000_000)                                # 4 ms
    clock.now += 3e-3                                              # 3 ms of computation overlap it
    link.wait_until(done)
    assert clock.slept == [pytest.approx(1e-3)]
    link.wait_until(done)                                          # already complete: no sleep
    assert len(clock.slept) == 1
