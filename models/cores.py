"""The cores this process may use: torch-free, for the process pools of stages that do not train."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's limit), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
