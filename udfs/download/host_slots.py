"""A per-host concurrency limit shared by every thread of every process on one machine.

`download.per_domain_concurrency` caps one shard's threads on a host. But an executor runs one
Python worker PROCESS per task slot (Spark forks a worker per concurrent task), so with 8 cores a
host could see 8 x that cap. `HostSlots` caps requests in flight to one host across all threads
of all processes that use the same folder (default: one folder per machine under the temp dir),
with `cap` lock files per host: a request holds an exclusive `flock` on one of them.

Why flock: it is released by the kernel when a process dies (a killed task never leaks a slot),
it needs no server or shared memory set up by the driver (Spark Connect has no hook for that), and
two threads of one process conflict on it too, because each acquisition opens its own file
description. The cost is a few system calls per request (open, flock, close).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import tempfile
import time
from contextlib import contextmanager


def default_folder() -> str:
    return os.path.join(tempfile.gettempdir(), f"clipcrawl-host-slots-{os.getuid()}")


class HostSlots:
    """At most `cap` holders per host name at once (cap <= 0: no limit)."""

    def __init__(self, cap: int, folder: str | None = None, rng: random.Random | None = None):
        self.cap = int(cap or 0)
        self.folder = folder or default_folder()
        self._rng = rng or random.Random()
        self.waited_seconds = 0.0   # summed over acquisitions that found every slot taken
        if self.cap > 0:
            os.makedirs(self.folder, exist_ok=True)

    def _path(self, host: str, i: int) -> str:
        digest = hashlib.sha1(host.lower().encode("utf-8", "surrogatepass")).hexdigest()[:20]
        return os.path.join(self.folder, f"{digest}.{i}")

    def _open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)

    @contextmanager
    def slot(self, host: str):
        if self.cap <= 0:
            yield
            return
        fd = self._acquire(host)
        try:
            yield
        finally:
            os.close(fd)   # closing the description releases the lock

    def _acquire(self, host: str) -> int:
        start = self._rng.randrange(self.cap)   # spread holders over the slots
        for k in range(self.cap):
            fd = self._open(self._path(host, (start + k) % self.cap))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        # all taken: block on one; the holder of that one frees it within one request
        t0 = time.monotonic()
        fd = self._open(self._path(host, start))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.waited_seconds += time.monotonic() - t0
        return fd
