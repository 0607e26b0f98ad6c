"""The one file-lock helper: an exclusive OS lock (flock) on a file, with a bounded wait.

flock, not a marker file: the kernel releases it when the holding process ends however it ends (a
kill -9 included), so a crashed writer never blocks the next one. Every lock of the project goes
through `file_lock`: the run lock, the bundle store's publish lock, its additions lock and the event
log's lock. A wait that runs out raises `LockBusy` (or the subclass the caller names), which carries
how long to wait before trying again (the HTTP service answers 503 with Retry-After).
"""
from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from flows.errors import LockBusy

POLL_S = 0.02     # how often a bounded wait tries again


@contextmanager
def file_lock(path: Path, *, wait_s: float | None = 0.0, busy: str | Callable[[], str] = "",
              error: type[LockBusy] = LockBusy) -> Iterator[IO[str]]:
    """Hold an exclusive lock on `path` (created if missing) for the block; yields the open file
    (a holder may record who it is in it). wait_s: 0 fails at once, None waits as long as it takes,
    else up to that many seconds. A busy lock raises `error(busy)` (busy: the message, or a function
    that writes it when needed, e.g. from what the holder recorded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        _acquire(handle, wait_s, busy or f"{path.name} is held by another process", error)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle: IO[str], wait_s: float | None, busy: str | Callable[[], str], error: type[LockBusy]) -> None:
    if wait_s is None:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                # try again after about as long as we waited (at least a second: Retry-After is whole seconds)
                raise error(busy() if callable(busy) else busy, retry_after_s=max(1.0, wait_s)) from None
            time.sleep(POLL_S)
