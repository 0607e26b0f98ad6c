"""Independent jobs of one stage side by side, in worker processes that inherit the stage's prepared
data at fork.

The rank stage fits each candidate ranker from its own seed on `rank.threads` torch threads, the train
stage its evaluation and refit models, the validate stage a large table's batches; the jobs share
nothing but their read-only input (the prepared log's path, the feature tables), so on a machine with
more cores than one job uses they can run at once. Forked workers see that input
copy-on-write: a feature table of a million users is neither pickled nor copied per worker. A job is
a picklable callable of that input (a `functools.partial` of a module function) and returns something
small: trained weights and a report row, never the input itself.

With one worker, or where fork is not available (Windows, macOS' default), the jobs run here one after
another: the same results either way, since every fit seeds its own generators and runs on the same
number of threads (the train stage's refit model, which takes every thread for its last epochs on a
schedule fixed by the row counts, differs from one process's in the last digits). A job's
exception is raised here as it was raised there, and a stop (SIGTERM, Ctrl-C) ends the workers at
once rather than after their fits; a worker that dies (the kernel's OOM killer) raises
BrokenProcessPool naming the jobs left unfinished.
"""
from __future__ import annotations

import gc
import importlib
import multiprocessing as mp
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from models.cores import usable_cores

T = TypeVar("T")
R = TypeVar("R")

WAKE_S = 0.2      # how often the waiting parent wakes to take a signal

# The input a worker inherited at fork. A module global because that is the one place a forked
# process can find what its parent held without pickling it; set only in a worker (by _start).
_INHERITED: Any = None


def resolve_workers(workers: int | str, threads: int, jobs: int) -> int:
    """How many processes fit at once: a count as given, or auto = the usable cores over each job's
    threads; never more than there are jobs."""
    if workers == "auto":
        workers = max(1, usable_cores() // max(threads, 1))
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive count or 'auto' (got {workers!r})")
    return max(1, min(workers, jobs))


def _start(shared: Any, threads: int) -> None:
    global _INHERITED
    # What a worker inherited is hidden from its garbage collector first (the gc module's advice for a
    # fork without exec; freezing relinks the collector's lists, it visits no object): each full
    # collection of a worker scanned every object of the libraries and the input it inherited, and
    # wrote to their pages, copying them. Frozen here, not in the parent before the fork: the parent
    # could only thaw what it froze for the fork together with what it had frozen itself (a stage
    # process freezes its libraries, flows/environment.py import_frozen), and its data alive at the
    # fork would stay frozen for good, never freed if only a cycle held it.
    gc.freeze()
    _INHERITED = shared
    if "torch" in sys.modules:     # jobs without torch (validation's) need not import it
        sys.modules["torch"].set_num_threads(threads)
    # the parent's handlers came along with the fork: its SIGTERM-as-SystemExit would end the job, not
    # the worker (the pool sends the exception back and hands it the next job). A worker ends on
    # SIGTERM (the parent's terminate, a stopped group) and leaves Ctrl-C to the parent, which ends it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(job: Callable[[Any], R]) -> R:
    return job(_INHERITED)


# What a torch fit imports lazily: its first optimizer imports torch._dynamo (torch.optim), 1.6 s of
# CPU on a 2-core host. Named in run_jobs' `preload`, it is imported once before the fork, not once
# in every worker (the rank stage's four fits imported it four times).
TORCH_FIT = ("torch._dynamo",)


def run_jobs(jobs: Sequence[tuple[str, Callable[[T], R]]], shared: T, workers: int, threads: int,
             preload: Sequence[str] = ()) -> list[R]:
    """Each (name, job)'s job(shared), in `workers` processes at once (forked here, so they inherit
    `shared` and the modules `preload` names, imported here first), results in the jobs' order. Give
    the longest jobs first: a worker takes the next job when it is free."""
    if workers <= 1 or len(jobs) <= 1 or "fork" not in mp.get_all_start_methods():
        return [job(shared) for _, job in jobs]
    for name in preload:
        importlib.import_module(name)
    before = set(mp.active_children())
    fork, workers = mp.get_context("fork"), min(workers, len(jobs))
    with ProcessPoolExecutor(workers, mp_context=fork, initializer=_start, initargs=(shared, threads)) as pool:
        futures = [(name, pool.submit(_run, job)) for name, job in jobs]
        # forked pools start every worker at the first submit
        started = [p for p in mp.active_children() if p not in before]
        try:
            pending = [future for _, future in futures]
            while pending:
                # in short waits: a SIGTERM taken by the pool's manager thread only runs its Python
                # handler when the main thread runs again (a wait without a timeout: the whole fit)
                done, not_done = wait(pending, timeout=WAKE_S, return_when=FIRST_EXCEPTION)
                pending = [] if any(f.exception() is not None for f in done) else list(not_done)
            for _, future in futures:        # a failed job before any still running: its error now
                if future.done() and future.exception() is not None:
                    raise future.exception()
            return [future.result() for _, future in futures]
        except BrokenProcessPool as exc:
            running = [name for name, future in futures if not future.done() or future.exception() is not None]
            raise BrokenProcessPool(f"a worker process died (out of memory? fewer workers hold less) while "
                                    f"these jobs were unfinished: {', '.join(running)}") from exc
        except BaseException:
            # a failed job, or a stop (SIGTERM, Ctrl-C) while waiting: leaving the pool would wait for
            # every running fit to end (minutes at scale; 87 s measured), so the workers go first
            for process in started:
                process.terminate()
            raise
