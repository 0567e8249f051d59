"""One preparer per cache directory: an exclusive lock on `DIR/.prepare.lock`, held while preparing.

The lock is the kernel's (`fcntl.flock`) on a lock file that also names its holder (host, pid, start):
a holder that dies, even by SIGKILL, releases it with its file descriptors, so a stale lock file left
by a dead pid is simply taken over by the next preparer. A second preparer (another job, another
node's preparer on a shared filesystem) waits, logging who it waits for every `LOG_EVERY_S`, then
finds the work done. On a filesystem without flock support (some network mounts) the lock cannot be
taken: that is an error naming the directory, never two writers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)
LOCK_NAME = ".prepare.lock"
LOG_EVERY_S = 30.0


class PrepareLock:
    def __init__(self, cache_dir: str | os.PathLike, wait_s: float | None = None, poll_s: float = 0.5):
        self.path = Path(cache_dir) / LOCK_NAME
        self.wait_s, self.poll_s = wait_s, poll_s
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {owner['pid']} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def __enter__(self) -> PrepareLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start = last_log = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise OSError(f"cannot lock {self.path} ({e.strerror}): the filesystem of data.cache_dir must "
                                  "support file locks so that two preparers never write one directory") from e
            now = time.monotonic()
            if self.wait_s is not None and now - start > self.wait_s:
                os.close(fd)
                raise TimeoutError(f"waited {self.wait_s:.0f} s (data.prepare_wait_s) for {self.holder()} to finish "
                                   f"preparing data in {self.path.parent}")
            if now - last_log >= LOG_EVERY_S:
                last_log = now
                log.info("waiting for %s, preparing data in %s (%.0f s so far)", self.holder(), self.path.parent,
                         now - start)
            time.sleep(self.poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
