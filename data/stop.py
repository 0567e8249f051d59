"""SIGTERM during data preparation: stop within seconds instead of hours.

A scheduler's pre-emption sends SIGTERM and, a grace period later, SIGKILL. Preparation runs for hours,
so inside `stop_on_sigterm()` the signal raises `PreparationStopped` in the main thread: the worker
pool is terminated, the lock released, and the directory is left as it was at the last finished shard
(data/pack.py records it): a rerun resumes there. The previous handler is restored on leaving.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class PreparationStopped(BaseException):
    """SIGTERM arrived while data was being prepared (a BaseException: no `except Exception` swallows it)."""


def _raise(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # one stop: a repeat does not interrupt the cleanup
    raise PreparationStopped("SIGTERM during data preparation")


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
