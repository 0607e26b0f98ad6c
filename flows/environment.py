"""Process environment set before any library is imported: telemetry off, state inside the project.

Called by the CLI entry point (never at import time). `setdefault` lets a user opt back in explicitly.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "1",                          # Prefect client analytics, Evidently UI/collector
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # Prefect server analytics
    "DVC_NO_ANALYTICS": "1",                      # DVC usage analytics
    "DVC_NO_UPDATER": "1",                        # DVC "new version available" check
    "GX_ANALYTICS_ENABLED": "false",              # Great Expectations (context config also says so)
    "FEAST_USAGE": "False",                       # older Feast releases; 0.67 ships no telemetry
    "HF_HUB_OFFLINE": "1",
}


# OpenMP threads that have no work spin before they sleep; how long decides two opposite cases (torch's
# GNU OpenMP, 2 threads, the 700k-interaction bench shape, examples/s; docs/TRAINING.md):
#   idle machine:            default spin (300,000) 49k | 10,000 46k | PASSIVE (no spin) 21k
#   8 busy processes beside: default spin 1.2k          | 10,000 2.6k | PASSIVE 2.8k
# Sleeping at once halves training speed on an idle machine (each of a step's hundreds of short parallel
# regions waits for a sleeping thread to wake); spinning long starves the partner thread on cores other
# processes share (10x slower than 1 thread at load 13.7). A short spin keeps both: near the idle speed,
# near PASSIVE's under load. Set only when the user chose neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT
# (GOMP_SPINCOUNT wins over the policy in libgomp). Read when torch loads, so it is set before any import;
# the Makefile sets the same for the test processes, which import torch before any CLI code runs.
SPIN_COUNT = "10000"


def set_openmp_wait() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


# Feast decorates its classes with typeguard's @typechecked, which re-parses and recompiles every
# method with run-time type checks when Feast is imported: about half of `import feast` (12.5 s ->
# 6 s on a loaded 2-core machine), paid by every command that reads features, `towerflow recommend`
# included. Typeguard documents the decorator as a development aid that is a no-op under `python -O`;
# this makes it one without -O (which would also strip the project's asserts). Feast is its only user
# here. TOWERFLOW_TYPEGUARD=1 keeps Feast's checks (when debugging a Feast call).
KEEP_TYPEGUARD = "TOWERFLOW_TYPEGUARD"


def _not_instrumented(target: Any = None, **_options: Any) -> Any:
    """typeguard.typechecked, as under `python -O`: the target itself (also as `@typechecked(...)`)."""
    return target if target is not None else (lambda t: t)


def skip_type_instrumentation() -> None:
    """Before Feast is imported: its @typechecked classes are left as written (see KEEP_TYPEGUARD)."""
    if os.environ.get(KEEP_TYPEGUARD) == "1" or importlib.util.find_spec("typeguard") is None:
        return
    import typeguard
    typeguard.typechecked = _not_instrumented


def import_frozen(modules: Iterable[str], importers: Mapping[str, Callable[[], object]] | None = None) -> None:
    """Import the libraries a process is about to use (a stage's, a serving process's) with the garbage
    collector paused, then move every object alive out of its sight (gc.freeze), as the gc module
    advises for long-lived state. Call it before the process makes data of its own: what is frozen is
    never collected. Importing GX, Feast, Evidently or torch makes 170k-500k objects that live as long
    as the process; the collector's full passes over them, while they are imported (one each time the
    tracked objects grew by a quarter) and at every full pass after, were 10-20 % of a small stage's
    CPU (the tiny test project's materialize stage 15.1-15.9 -> 12.2-12.3 s). What the imports
    leave as cyclic garbage (1k-10k objects) stays, frozen. A process that already has every module
    (a test worker) is left as it is; a module that cannot be imported is left to the stage, which
    says why in its own words. A module named in `importers` is imported by calling its importer
    (which imports at least that module: Feast without torch, for one)."""
    missing = [name for name in modules if name not in sys.modules]
    if not missing:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in missing:
            with suppress(ImportError):
                (importers or {}).get(name, lambda: importlib.import_module(name))()
    finally:
        if enabled:
            gc.enable()
    gc.freeze()


def telemetry_off() -> None:
    """Every library's usage reporting off unless the user set the variable (also for processes this
    one starts: Prefect's temporary server, DVC, the stage commands)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def configure_environment(root: Path) -> None:
    telemetry_off()
    set_openmp_wait()
    skip_type_instrumentation()
    # Prefect keeps its database and settings in the project, not in the user's home.
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    # Prefect's temporary server gets 20 s to start by default; on a busy 2-core machine (a scheduled
    # run beside a training job) it took longer and the whole run failed before its first stage.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
