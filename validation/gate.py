"""The run summary of a validation (validation.json) and what a failure or a warning prints."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from validation.errors import ValidationFailed
from validation.runner import Failure

log = logging.getLogger("towerflow.validate")


def summarize(stats: dict[str, dict], failures: list[Failure], index: Path, started: float) -> dict[str, Any]:
    errors = [f for f in failures if f.severity == "error"]
    return {
        "success": not errors,
        "docs": str(index),
        "errors": len(errors),
        "warnings": len(failures) - len(errors),
        "seconds": round(time.perf_counter() - started, 2),
        "tables": stats,
        "failures": [asdict(f) for f in errors],
        "warned": [asdict(f) for f in failures if f.severity != "error"],
    }


def raise_or_warn(failures: list[Failure], index: Path, what: str = "validation") -> None:
    """Errors stop the run (ValidationFailed); warnings alone are logged and the run goes on."""
    errors = [f for f in failures if f.severity == "error"]
    warned = [f for f in failures if f.severity != "error"]
    lines = ["  warning: " + f.line() for f in warned]
    if errors:
        n, k = len(errors), len({f.table for f in errors})
        head = (f"{what} failed: {n} expectation{'s' * (n != 1)} on {k} "
                f"table{'s' * (k != 1)} (see {index})")
        raise ValidationFailed("\n".join([head, *("  " + f.line() for f in errors), *lines]))
    if warned:
        log.warning("\n".join([f"{what} passed with {len(warned)} warning{'s' * (len(warned) != 1)} "
                               f"(see {index})", *lines]))
