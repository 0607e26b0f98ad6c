"""Expensive test inputs built once per test run, however many pytest-xdist workers share it.

A session fixture runs once per process, and each xdist worker is its own process: without this, a
tiny trained project would be built once by every worker (the same CPU spent twice on 2 cores).
The first worker to ask builds it under an flock; the others wait on the lock, then read it.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.locks import file_lock


def run_temp(factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of this test run, the same in every worker: under xdist each worker's
    basetemp is a child of it (popen-gw0, popen-gw1, ...); without xdist it is the basetemp itself."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, filled by `build(folder)` the first time any worker of this run asks for
    it. Readers must not write into it (copy it first): other workers read it at the same time."""
    base = run_temp(factory)
    folder, done = base / name, base / f"{name}.done"
    with file_lock(base / f"{name}.lock", wait_s=None):
        if not done.exists():
            # a worker whose build raised left a partial folder behind: start again from nothing
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder
