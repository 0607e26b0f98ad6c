"""One pipeline run at a time per project: an exclusive lock on `<project>/.towerflow/run.lock`.

An OS lock (flock), not a marker file: it is released when the holding process ends however it ends
(a kill -9 included), so a crashed run never blocks the next one. The file records who holds it.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flows.errors import RunInProgress

LOCK = Path(".towerflow") / "run.lock"


@contextmanager
def run_lock(root: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the project's run lock; refused at once while another run holds it, or after waiting up to
    wait_s seconds for it (scheduled runs: a nightly and an hourly deployment take turns)."""
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        _acquire(handle, path, root, wait_s)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(handle, path: Path, root: Path, wait_s: float) -> None:  # noqa: ANN001 - an open file
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
    handle.seek(0)
    holder = handle.read().strip() or "{}"
    waited = f" after waiting {wait_s:g} s" if wait_s else ""
    raise RunInProgress(f"another towerflow run of {root} is in progress ({_describe(holder)}){waited}; "
                        f"wait for it to finish (lock: {path})")


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
    except ValueError:
        return "holder unknown"
    return f"pid {info.get('pid', '?')}, started {info.get('started', '?')}"
