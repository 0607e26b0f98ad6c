"""One pipeline run at a time per project: an exclusive lock on `<project>/.towerflow/run.lock`.

An OS lock (flock), not a marker file: it is released when the holding process ends however it ends
(a kill -9 included), so a crashed run never blocks the next one. The file records who holds it.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flows.errors import RunInProgress
from flows.locks import file_lock

LOCK = Path(".towerflow") / "run.lock"


@contextmanager
def run_lock(root: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the project's run lock; refused at once while another run holds it, or after waiting up to
    wait_s seconds for it (scheduled runs: a nightly and an hourly deployment take turns)."""
    path = root / LOCK

    def busy() -> str:
        holder = path.read_text().strip() if path.is_file() else ""
        waited = f" after waiting {wait_s:g} s" if wait_s else ""
        return (f"another towerflow run of {root} is in progress ({_describe(holder or '{}')}){waited}; "
                f"wait for it to finish (lock: {path})")

    with file_lock(path, wait_s=wait_s, busy=busy, error=RunInProgress) as handle:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
    except ValueError:
        return "holder unknown"
    return f"pid {info.get('pid', '?')}, started {info.get('started', '?')}"
