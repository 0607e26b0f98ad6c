"""Ending what a command started: SIGTERM as a clean exit, and a child's whole process group stopped.

A stage of a run, a scale bench's measured stage and the processes they start each lead a process group
of their own (so one signal reaches all of them and none outlives its caller); these are the two ends of
that: `stop_group` once the caller is done with a group (or is itself being stopped), and
`sigterm_exits` so that being stopped runs the caller's cleanup at all.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Protocol

# After SIGTERM, a group's processes get this long to end before SIGKILL.
STOP_GRACE_S = 10.0


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within it, SIGTERM raises SystemExit(143) in the main thread instead of ending the process on
    the spot: `finally` blocks, context managers and exit handlers run (a scale bench's temporary
    project of up to tens of GB removed, the stage it measures stopped; Prefect's temporary API server
    stopped at exit). Prefect's flow engine answers a SIGTERM by crashing the flow, putting back the
    handler it found and sending the signal again: with the default handler a stopped `towerflow run`
    left that server running, orphaned. A handler already set (by the caller, uvicorn, Prefect's runner)
    is left alone, and so is a thread other than the main one (signals reach only that one)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Leader(Protocol):
    """A process group's leader as its caller holds it: a `subprocess.Popen`, or a process the run's
    fork server started (flows/fork_server.py `Forked`)."""
    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def stop_group(proc: Leader, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the process group `proc` leads (started with start_new_session=True) and reap `proc`:
    SIGTERM, then SIGKILL after grace_s, whatever of the group still runs."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(proc.pid, proc):
            break
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(proc.pid, proc):
            time.sleep(0.1)
    proc.wait()


def _group_alive(pgid: int, leader: Leader) -> bool:
    """Whether a process of group `pgid` still runs (zombies waiting to be reaped do not count)."""
    import psutil

    leader.poll()   # reap the leader once it ended
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def still_running(pid: int) -> Callable[[], bool]:
    """A check of whether process `pid`, the one running now, still runs: False once it has ended,
    is a zombie (ended, not reaped yet) or its pid was taken by a later process (psutil compares
    start times)."""
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return lambda: False

    def running() -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    return running
