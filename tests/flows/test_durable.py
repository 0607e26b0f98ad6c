"""Crash-safe writes to the byte (flows/durable.py) and the one lock helper (flows/locks.py).

A full disk is a real file size limit (RLIMIT_FSIZE) in a child process: the kernel then writes part
of a buffer and refuses the rest, exactly what a disk running full does. Kill -9 tests SIGKILL a
real writer part way; nothing is mocked.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.durable import append_records
from flows.errors import LockBusy, StoreBusy
from flows.locks import file_lock
from flows.serving.events import EventLog

ROOT = Path(__file__).resolve().parents[2]
FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
import pandas as pd
from flows.serving.events import EventLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails with EFBIG instead
log, limit = Path(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
events = pd.DataFrame({"user_id": list(range(50)), "item_id": [7] * 50,
                       "timestamp": pd.Timestamp("2024-01-01", tz="UTC")})
try:
    EventLog(log).append(events)
    print("appended")
except OSError as exc:
    print(f"refused {exc.errno}")
"""
APPENDER = """
import sys
from pathlib import Path
from flows.durable import append_records
path, n = Path(sys.argv[1]), 0
filler = "x" * 40000
while True:
    # 16 MB per append in few lines: the time goes into the write itself, where a kill tears a line
    lines = [f'{{"n": {n + i}, "pad": "{filler}"}}' for i in range(400)]
    print(f"writing {n}", flush=True)
    append_records(path, lines)
    n += len(lines)
    print(f"acked {n}", flush=True)
"""
HOLDER = """
import sys, time
from pathlib import Path
from flows.locks import file_lock
with file_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _child(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _events(n: int) -> pd.DataFrame:
    return pd.DataFrame({"user_id": list(range(n)), "item_id": [3] * n, "timestamp": pd.Timestamp("2024-01-01", tz="UTC")})


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\n")


def test_an_append_on_a_full_disk_is_refused_whole_and_leaves_no_torn_line(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    first = log.append(_events(3))
    before = first.read_bytes()
    limit = len(before) + 100                        # room for one short write of part of the first line
    proc = _child(FULL_DISK, str(tmp_path), str(limit))
    out, err = proc.communicate(timeout=120)
    assert out.strip() == "refused 27", out + err    # EFBIG: the loop went on after the short write
    assert first.read_bytes() == before              # cut back: no half event for the next reader
    log.append(_events(2))
    assert [json.loads(line)["user_id"] for line in _lines(first) if line] == [0, 1, 2, 0, 1]


def test_a_torn_tail_left_by_a_killed_writer_is_ended_not_extended(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"user_id": 1}\n{"user_id": 2, "item_')      # what a kill mid-write leaves
    append_records(path, ['{"user_id": 3}', '{"user_id": 4}'])
    lines = _lines(path)
    assert lines == ['{"user_id": 1}', '{"user_id": 2, "item_', '{"user_id": 3}', '{"user_id": 4}', ""]


def test_kill_during_appends_loses_no_acknowledged_record(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    proc = _child(APPENDER, str(path))
    acked = 0
    try:
        while True:                                  # two appends done, then killed inside the third
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if line.startswith("acked"):
                acked = int(line.split()[1])
            elif acked >= 800:
                time.sleep(0.04)     # into the 16 MB write: here (2 cores, overlay disk) the line is torn
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    append_records(path, ['{"n": -1}'])              # the next writer after the kill
    lines = [line for line in _lines(path) if line]
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append(json.loads(line)["n"])
        except ValueError:
            assert i == len(lines) - 2, f"a torn line that is not the killed append's: line {i}"
    assert parsed[:acked] == list(range(acked)) and parsed[-1] == -1


def test_a_bounded_wait_for_a_held_lock_gives_up_with_a_retry_time(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    proc = _child(HOLDER, str(lock), "300")
    try:
        assert proc.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(StoreBusy, match="busy now") as caught:
            with file_lock(lock, wait_s=0.3, busy="busy now", error=StoreBusy):
                pass
        assert 0.3 <= time.monotonic() - t0 < 2 and caught.value.retry_after_s >= 1
        assert isinstance(caught.value, LockBusy)
    finally:
        os.kill(proc.pid, signal.SIGKILL)            # a killed holder never leaves a stale lock
        proc.wait()
    with file_lock(lock, wait_s=0):
        pass


def test_an_unbounded_wait_gets_the_lock_when_the_holder_ends(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    proc = _child(HOLDER, str(lock), "0.5")
    try:
        assert proc.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with file_lock(lock, wait_s=None):           # waits (no error) until the holder lets go
            assert time.monotonic() - t0 > 0.2
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
