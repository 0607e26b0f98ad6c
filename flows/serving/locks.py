"""Bounded waits for the serving writers' cross-process file locks (flock).

A request that waits for another writer holds an HTTP worker thread and its caller; past a bound
it is answered 503 with Retry-After instead (ServiceBusy), and the caller tries again.
"""
from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.errors import TransientError

POLL_S = 0.02


class ServiceBusy(TransientError):
    """Another writer held a lock longer than the wait allowed (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@contextmanager
def flock_bounded(path: Path, wait_s: float, what: str) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing), waited for at most wait_s seconds;
    `what` names the writer in the ServiceBusy message. Released when its process dies."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceBusy(f"another process has been {what} for {wait_s:g} s; try again later",
                                      retry_after_s=max(1.0, wait_s)) from None
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
