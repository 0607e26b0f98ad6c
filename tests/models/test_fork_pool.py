"""models/fork_pool.py: independent jobs in forked workers that inherit the stage's input (never
pickled), results in the jobs' order, a job's error raised as it was, and one worker = here."""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from models.fork_pool import resolve_workers, run_jobs

ROOT = Path(__file__).resolve().parents[2]


class Unpicklable:
    """The shared input: an array, and a refusal to be pickled (a worker that got it by pickling fails)."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __reduce__(self):
        raise TypeError("the shared input was pickled")


def _job(index: int, shared: Unpicklable) -> tuple[int, int, float, int]:
    return index, os.getpid(), float(shared.values[index]), shared.values.ctypes.data


def _failing(shared: Unpicklable) -> None:
    raise ValueError("job 3 cannot fit")


def _scanned(shared: Unpicklable) -> tuple[int, int]:
    """(objects frozen out of this worker's collections, objects its collections still scan)."""
    return gc.get_freeze_count(), len(gc.get_objects())


def test_what_a_worker_inherits_is_not_scanned_by_its_collections() -> None:
    """A forked worker's full collections would scan (and write to the pages of) every object it
    inherited; those are frozen there. The parent's own objects stay as they were: collected, or
    frozen where it froze them itself (a stage process's libraries) and no more."""
    gc.unfreeze()            # tests/conftest.py freezes the worker's objects at each module's start
    held = [[i] for i in range(100_000)]         # tracked objects the worker inherits
    try:
        results = run_jobs([("a", _scanned), ("b", _scanned)], Unpicklable(np.arange(3.0)), workers=2, threads=1)
        assert all(frozen > len(held) for frozen, _ in results)
        assert all(scanned < len(held) for _, scanned in results)
        assert gc.get_freeze_count() == 0 and len(gc.get_objects()) > len(held)
        gc.freeze()          # the caller's own frozen objects
        frozen = gc.get_freeze_count()
        alive_at_fork = [[i] for i in range(1000)]                # made after the caller's freeze
        results = run_jobs([("a", _scanned), ("b", _scanned)], Unpicklable(np.arange(3.0)), workers=2, threads=1)
        assert all(inherited > frozen + len(alive_at_fork) for inherited, _ in results)
        assert gc.get_freeze_count() <= frozen      # nothing more frozen here (some of the frozen died)
        del alive_at_fork
    finally:
        del held
        gc.freeze()          # as tests/conftest.py left it


def test_workers_inherit_the_input_and_return_in_order() -> None:
    shared = Unpicklable(np.arange(8, dtype=np.float64) * 10)
    jobs = [(f"job {i}", partial(_job, i)) for i in range(8)]
    results = run_jobs(jobs, shared, workers=2, threads=1)
    assert [r[0] for r in results] == list(range(8)) and [r[2] for r in results] == [i * 10.0 for i in range(8)]
    pids = {r[1] for r in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # the workers read the parent's array at its own address: inherited at fork, not a copy sent over
    assert {r[3] for r in results} == {shared.values.ctypes.data}
    here = run_jobs(jobs, shared, workers=1, threads=1)
    assert [r[1] for r in here] == [os.getpid()] * 8 and [r[2] for r in here] == [r[2] for r in results]


def _slow(shared: Unpicklable) -> None:
    time.sleep(60)


def test_a_jobs_error_is_raised_here_without_waiting_for_the_others() -> None:
    """The failing job's error comes back at once: the worker still fitting is ended, not waited for
    (leaving the pool waits for its running jobs; a stop by SIGTERM goes the same way)."""
    jobs = [("slow", _slow), ("bad", _failing)]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="job 3 cannot fit"):
        run_jobs(jobs, Unpicklable(np.zeros(2)), workers=2, threads=1)
    assert time.perf_counter() - t0 < 20 and not mp.active_children()


def test_resolve_workers() -> None:
    assert resolve_workers(3, 1, 10) == 3 and resolve_workers(3, 1, 2) == 2 and resolve_workers(1, 4, 9) == 1
    cores = len(os.sched_getaffinity(0))
    assert resolve_workers("auto", 1, 99) == cores and resolve_workers("auto", cores + 1, 99) == 1
    with pytest.raises(ValueError, match="positive count or 'auto'"):
        resolve_workers(0, 1, 5)


STOPPED = """
import sys, time
from functools import partial
from flows.process_groups import sigterm_exits
from models.fork_pool import run_jobs

def slow(i, shared):
    time.sleep(120)

with sigterm_exits():
    print("fitting", flush=True)
    run_jobs([(str(i), partial(slow, i)) for i in range(4)], None, 2, 1)
"""


def test_a_stop_ends_the_workers_at_once() -> None:
    """SIGTERM to a stage waiting on its fits (towerflow's handler: SystemExit 143) ends it and its
    workers within seconds, not after the fits (the workers had inherited that handler: each job took
    the exit as its error and the pool went on; measured 87 s at 4M)."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", STOPPED], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "fitting"
        deadline = time.monotonic() + 30
        while len(psutil.Process(proc.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        assert time.monotonic() - t0 < 10
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        proc.kill()
        proc.wait()


def _imported_before_the_job(name: str, _shared: object) -> bool:
    return name in sys.modules


def test_preloaded_modules_are_imported_once_before_the_fork(tmp_path, monkeypatch):
    """`preload` (the fits' TORCH_FIT: torch._dynamo, 1.6 s of CPU that each fit's first optimizer
    imported in its own worker) is imported here, so the workers start with it."""
    name = "tf_fork_pool_preloaded"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    jobs = [(f"job {i}", partial(_imported_before_the_job, name)) for i in range(2)]
    assert run_jobs(jobs, None, 2, 1) == [False, False]
    assert name not in sys.modules
    try:
        assert run_jobs(jobs, None, 2, 1, preload=(name,)) == [True, True]
        assert name in sys.modules
    finally:
        sys.modules.pop(name, None)
