"""Writes that survive a crash to the byte: what a reader finds is the old state or the new one.

- `write_all`: os.write may write fewer bytes than asked (a full disk, a file size limit, a signal):
  the rest is written in a loop, and a failure part way raises instead of leaving a torn record.
- `append_records`: appends whole lines to a log; a failure part way is cut back to where the file
  was, and a torn tail left by a killed writer is closed with a newline first, so a new record
  never glues onto it (readers skip the one torn line).
- `replace_file` / `write_atomic`: a temporary file in the same folder, written and fsynced, then
  renamed over the target and the folder fsynced: the new name never points at unflushed data.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def pause_point(name: str) -> None:
    """Test hook for the kill -9 tests: with TOWERFLOW_TEST_PAUSE_AT=<name> the process prints
    `paused at <name>` and sleeps (TOWERFLOW_TEST_PAUSE_S, default 60 s) so that a test can SIGKILL
    it at a known step. Names: `upsert` (after the first index batch), `switch` (bundle complete, LIVE
    not yet replaced), `prune` (a version renamed out of the listing, not yet removed), `live`
    (the target's digests verified, LIVE not yet replaced: a publish or a rollback). Unset, it costs
    one environment lookup."""
    if os.environ.get("TOWERFLOW_TEST_PAUSE_AT") == name:
        print(f"paused at {name}", flush=True)
        time.sleep(float(os.environ.get("TOWERFLOW_TEST_PAUSE_S", "60")))


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of data to fd (looping over short writes)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:     # POSIX allows 0 only for an empty write; never loop forever
            raise OSError(f"write made no progress ({len(view)} bytes left)")
        view = view[written:]


def fsync_file(path: Path) -> None:
    """Flush a file (or a folder: its names) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make the names in folder (a rename, a new file) durable."""
    fsync_file(folder)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under root to disk, so a rename of root publishes durable data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def append_records(path: Path, lines: list[str]) -> None:
    """Append lines (no newlines inside) to path durably: all of them or none (an error part way
    truncates the file back). Call under the log's lock: the check of the tail and the append must
    not interleave with another writer."""
    data = "".join(f"{line}\n" for line in lines).encode()
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data          # a killed writer's torn line: end it, do not extend it
        try:
            write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)       # no half record stays behind for the next reader
            raise
    finally:
        os.close(fd)
    if new:   # the file's name must survive a crash too
        fsync_dir(path.parent)


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary file beside path; it is fsynced, renamed over path, and the
    folder fsynced. Readers see the old file or the new one, never a torn one, even across a crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, text: str | bytes) -> None:
    """replace_file for text or bytes (short writes looped)."""
    data = text.encode() if isinstance(text, str) else text

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    replace_file(path, write)
