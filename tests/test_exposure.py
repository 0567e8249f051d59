"""parallel/exposure.py: exposed all-to-all time is the time in which every running chunk waits, on a fake clock."""
from parallel.exposure import ExposedWait


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_lone_chunk_waiting_is_exposed_and_its_compute_is_not():
    clock = Clock()
    meter = ExposedWait(clock)
    with meter.chunk():
        clock.t += 2.0                 # computing
        with meter.blocked():
            clock.t += 3.0             # waiting, nothing else runs
        clock.t += 1.0
    assert meter.take() == (3.0, 0.0)
    assert meter.take() == (0.0, 0.0)  # taken


def test_a_wait_hidden_by_the_other_chunk_of_the_pair_is_not_exposed():
    """The overlapped pair (two threads, interleaved here by hand): the backward waits while the forward
    computes (hidden), then both wait (exposed), then the forward ends while the backward still waits (exposed)."""
    clock = Clock()
    meter = ExposedWait(clock)
    fwd, bwd = meter.chunk(), meter.chunk()
    fwd.__enter__()
    bwd.__enter__()
    b_wait = meter.blocked()
    b_wait.__enter__()
    clock.t += 4.0                     # the backward waits, the forward computes: hidden
    f_wait = meter.blocked()
    f_wait.__enter__()
    clock.t += 1.5                     # both wait: exposed
    f_wait.__exit__(None, None, None)
    clock.t += 2.0                     # the forward computes again: hidden
    fwd.__exit__(None, None, None)
    clock.t += 0.5                     # the backward is the only chunk and waits: exposed
    b_wait.__exit__(None, None, None)
    clock.t += 1.0                     # the backward computes
    bwd.__exit__(None, None, None)
    assert meter.take() == (2.0, 0.0)


def test_waits_outside_any_chunk_are_not_counted_and_a_wait_in_progress_is_counted_up_to_now():
    clock = Clock()
    meter = ExposedWait(clock)
    with meter.blocked():
        clock.t += 5.0                 # no chunk runs (e.g. a pipeline receive): the bubble, not the all-to-all
    assert meter.take() == (0.0, 0.0)
    with meter.chunk(), meter.blocked():
        clock.t += 1.0
        assert meter.take() == (1.0, 0.0)
        clock.t += 2.0
    assert meter.take() == (2.0, 0.0)


def test_link_time_is_exposed_only_while_every_running_chunk_is_on_the_link():
    """A transfer first waits for the collective (and the slowest peer), then for the emulated link's remaining
    time: both are exposed when nothing else computes, only the second is link time, and one chunk on the link
    while the other waits for its peer is exposed but not link time."""
    clock = Clock()
    meter = ExposedWait(clock)
    a, b = meter.chunk(), meter.chunk()
    a.__enter__()
    with meter.blocked("collective"):
        clock.t += 1.0                 # the lone chunk waits for its peer
    with meter.blocked("link"):
        clock.t += 2.0                 # then for the link
    b.__enter__()
    a_link, b_peer = meter.blocked("link"), meter.blocked("collective")
    a_link.__enter__()
    b_peer.__enter__()
    clock.t += 4.0                     # one on the link, one on its peer: exposed, not link time
    b_peer.__exit__(None, None, None)
    b_link = meter.blocked("link")
    b_link.__enter__()
    clock.t += 8.0                     # both on the link
    for cm in (b_link, a_link, b, a):
        cm.__exit__(None, None, None)
    assert meter.take() == (15.0, 10.0)
    try:
        meter.blocked("nic").__enter__()
    except ValueError as e:
        assert "kind='nic'" in str(e)
    else:
        raise AssertionError("an unknown kind was accepted")
