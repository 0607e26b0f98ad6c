"""Process environment set before any library is imported: telemetry off, state inside the project.

Called by the CLI entry point (never at import time). `setdefault` lets a user opt back in explicitly.
"""
from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "1",                          # Prefect client analytics, Evidently UI/collector
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # Prefect server analytics
    "DVC_NO_ANALYTICS": "1",                      # DVC usage analytics
    "DVC_NO_UPDATER": "1",                        # DVC "new version available" check
    "GX_ANALYTICS_ENABLED": "false",              # Great Expectations (context config also says so)
    "FEAST_USAGE": "False",                       # older Feast releases; 0.67 ships no telemetry
    "HF_HUB_OFFLINE": "1",
}


# OpenMP threads that have no work spin for a while before they sleep (GNU OpenMP's default). On cores
# other processes share, a spinning thread takes the core its partner needs, and every parallel region
# waits for the slower one: 2 torch threads trained 10x slower than 1 on this 2-core machine under load
# (351 vs 3570 examples/s); PASSIVE threads sleep at once, and 2 threads were then as fast as 1 or faster
# (3762-20223 examples/s in the same window). Read when torch loads, so it is set before any import.
THREADING: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_environment(root: Path) -> None:
    for key, value in (TELEMETRY_OFF | THREADING).items():
        os.environ.setdefault(key, value)
    # Prefect keeps its database and settings in the project, not in the user's home.
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    # Prefect's temporary server gets 20 s to start by default; on a busy 2-core machine (a scheduled
    # run beside a training job) it took longer and the whole run failed before its first stage.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
