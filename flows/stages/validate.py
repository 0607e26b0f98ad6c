"""Stage validate: check data/ingested/* with Great Expectations before anything learns from it."""
from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from flows.errors import MissingStageInput, ValidationFailed
from validation.suites import TABLES


def load_schema(ingested: Path) -> dict[str, Any]:
    path = ingested / "schema.json"
    if not path.exists():
        raise MissingStageInput(f"{path}: not found; run `towerflow stage ingest` first")
    schema = json.loads(path.read_text())
    for key in ("user_id_dtype", "item_id_dtype"):
        if schema.get(key) not in ("int64", "string"):
            raise ValidationFailed(
                f"{path}: '{key}' must be 'int64' or 'string', got {schema.get(key)!r}")
    return schema


def load_table(path: Path) -> pd.DataFrame:
    """Read a parquet file so that integer columns stay integer when they hold nulls.

    pyarrow's default turns int64-with-nulls into float64 (e.g. ranking_logs.position, which is null
    on non-shown rows); the nullable Int64 keeps the values and dtype GX should see.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise MissingStageInput(f"{path}: not found; run `towerflow stage ingest` first")
    ints = {t: pd.Int64Dtype() for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64())}
    return pq.read_table(path).to_pandas(types_mapper=ints.get)


def validate(ingested: Path, docs_dir: Path, summary_path: Path,
             context_root: Path | None = None) -> dict[str, Any]:
    """Validate the ingested tables with the GX suites of validation.suites.

    Writes docs_dir/ (GX Data Docs, index.html) on every run, pass or fail, and summary_path
    (per table: rows, expectations evaluated/failed, success; plus the failures). The GX context lives
    in context_root/gx/ (default: summary_path's folder, i.e. the gitignored reports/).
    Raises ValidationFailed (headline + one line per failed expectation) when the data must not go on.
    """
    from validation.runner import run_suites
    from validation.suites import add_reference_columns, build_suites, suite_parameters

    schema = load_schema(ingested)
    frames = add_reference_columns({t: load_table(ingested / f"{t}.parquet") for t in TABLES})
    stats, failures, index = run_suites(
        frames, build_suites(schema), suite_parameters(now=datetime.now(timezone.utc)),
        context_root or summary_path.parent, docs_dir)

    summary = {
        "success": not failures and all(s["success"] for s in stats.values()),
        "tables": stats,
        "failures": [asdict(f) for f in failures],
        "docs": str(index),
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if not summary["success"]:
        n, k = len(failures), len({f.table for f in failures})
        head = (f"validation failed: {n} expectation{'s' * (n != 1)} on {k} "
                f"table{'s' * (k != 1)} (see {index})")
        raise ValidationFailed("\n".join([head, *("  " + f.line() for f in failures)]))
    return summary
