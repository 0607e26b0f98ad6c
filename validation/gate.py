"""One validation run, shared by both gates: the contract gate (the ingested tables,
validation/contract.py) and the training-set gate (validation/training_set.py).

A run checks the data (validation/runner.py), writes its summary (the run summary JSON: per table
rows and expectations evaluated/failed/warned, the failures and the warnings), saves the row counts
for the next run's volume check when it passed, and then stops the pipeline on errors or logs the
warnings.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.fork_pool import resolve_workers
from validation.batches import RowBatches
from validation.errors import ValidationFailed
from validation.params import ValidateParams
from validation.runner import Check, Failure, run_checks
from validation.suites import suite_parameters
from validation.volume import load_previous, save_counts, volume_parameters

log = logging.getLogger("towerflow.validate")


def run_gate(validate_cfg: ValidateParams, checks: list[Check], counts: dict[str, int],
             context_root: Path, site: str, docs_dir: Path, summary_path: Path,
             parameters: dict[str, Any] | None = None, started: float | None = None,
             what: str = "validation", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `checks`; write docs_dir/ (Data Docs, always) and summary_path; return the summary.

    counts: the row count of each table whose volume is checked against the previous run that passed
    (kept in context_root/volume.json, updated only when this run passes). parameters: run-time
    values of the suites besides the clock, the timestamp floor and the volume bounds. Raises
    ValidationFailed ("<what> failed: ...") when an error-severity expectation failed.
    """
    started = time.perf_counter() if started is None else started
    values = {**suite_parameters(datetime.now(timezone.utc), validate_cfg), **(parameters or {}),
              **volume_parameters(load_previous(context_root), list(counts), validate_cfg)}
    batches = max((c.batches.count for c in checks if isinstance(c.batches, RowBatches)), default=1)
    stats, failures, index = run_checks(checks, values, validate_cfg.severity.model_dump(), context_root, site,
                                        docs_dir, workers=resolve_workers(validate_cfg.workers, 1, batches))
    for table, rows in counts.items():
        stats.setdefault(table, {})["rows"] = rows
    summary = {**summarize(stats, failures, index, started), **(extra or {})}   # extra: e.g. ingest's events
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if summary["success"]:
        save_counts(context_root, counts)
    raise_or_warn(failures, index, what=what)
    return summary


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
