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
def run_lock(root: Path) -> Iterator[None]:
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "{}"
            raise RunInProgress(f"another towerflow run of {root} is in progress ({_describe(holder)}); "
                                f"wait for it to finish (lock: {path})") from None
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


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
    except ValueError:
        return "holder unknown"
    return f"pid {info.get('pid', '?')}, started {info.get('started', '?')}"
