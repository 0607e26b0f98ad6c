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


def configure_environment(root: Path) -> None:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    # Prefect keeps its database and settings in the project, not in the user's home.
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    # Prefect's temporary server gets 20 s to start by default; on a busy 2-core machine (a scheduled
    # run beside a training job) it took longer and the whole run failed before its first stage.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
