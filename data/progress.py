"""The progress of a long preparation: bytes of the corpus read (the ETA comes from them) and tokens/s.

On a terminal it is a tqdm bar on stderr; in a log file (a scheduler's job) it is one plain line
every `LOG_EVERY_S` seconds through the `data` logger, so the job log shows it without carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)
LOG_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, what: str, total_bytes: int, enabled: bool = True):
        self.what, self.total, self.enabled = what, max(1, total_bytes), enabled
        self.start = self.last_log = time.monotonic()
        self.tokens = 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, file=sys.stderr)

    def update(self, bytes_read: int, tokens: int) -> None:
        self.tokens = tokens
        if not self.enabled:
            return
        rate = tokens / max(1e-9, time.monotonic() - self.start)
        if self.bar is not None:
            self.bar.update(bytes_read - self.bar.n)
            self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
            return
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_S:
            self.last_log = now
            done = min(1.0, bytes_read / self.total)
            eta = (now - self.start) * (1 - done) / done if done > 0 else float("inf")
            log.info("%s: %.1f%% of %.1f MB read, %d tokens, %.2fM tokens/s, ETA %s", self.what, 100 * done,
                     self.total / 1e6, tokens, rate / 1e6, _duration(eta) if eta != float("inf") else "?")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
