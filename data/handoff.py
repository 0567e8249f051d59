"""Handing a preparation's result from the rank that prepared to the ranks that wait for it.

The waiting ranks poll a key-value store (train.py passes the process group's TCP store; anything with
`set`, `check` and `get` works) for the preparer's result instead of sitting in a collective: a
collective fails past the process group's timeout (30 min by default), a preparation of a real corpus
takes hours. The wait is bounded only by `wait_s` (data.prepare_wait_s; None: no limit) and logs a
line every `LOG_EVERY_S` so a job log shows what the rank is doing. The result travels as JSON (a shard
directory, or data/sources.py's {"train": {...}, "val": {...}}); a failure travels as its message.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

LOG_EVERY_S = 30.0
_CALLS = itertools.count()   # every rank calls the preparations in the same order: one key each


class Store(Protocol):
    def set(self, key: str, value: str) -> None: ...
    def check(self, keys: list[str]) -> bool: ...
    def get(self, key: str) -> bytes: ...


def next_key(preparer: int) -> str:
    """The key of the next preparation whose result rank `preparer` publishes (same sequence on every rank)."""
    return f"moe_data/prepared/{next(_CALLS)}/{preparer}"


def publish(store: Store | None, key: str, result: Any = None, error: BaseException | None = None) -> None:
    if store is not None:
        value = {"error": f"{type(error).__name__}: {error}"} if error is not None else {"result": result}
        store.set(key, json.dumps(value))


def wait_for(store: Store, key: str, who: str, wait_s: float | None, say: Callable[[str], None],
             poll_s: float = 0.25) -> Any:
    """The result `who` publishes under `key`; its failure raised here as a RuntimeError naming it."""
    start = last = time.monotonic()
    while not store.check([key]):
        now = time.monotonic()
        if wait_s is not None and now - start > wait_s:
            raise TimeoutError(f"waited {wait_s:.0f} s (data.prepare_wait_s) for {who} to prepare the data; "
                               "prepare it once beforehand with scripts/prepare_data.py and set data.prepared")
        if now - last >= LOG_EVERY_S:
            last = now
            say(f"waiting for {who} to prepare the data ({now - start:.0f} s so far)")
        time.sleep(poll_s)
    value = json.loads(store.get(key))
    if "error" in value:
        raise RuntimeError(f"{who} failed to prepare the data ({value['error']})")
    return value["result"]
