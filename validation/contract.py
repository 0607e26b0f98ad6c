"""The contract gate: the ingested tables (users, items, interactions, ranking_logs) checked before
anything learns from them (the validate stage).

The suites come from `schema.json` (validation/suites.py). Each table gets a row check over its
batches, with the derived columns that carry the cross-row checks (validation/batches.py); its
cardinality expectations run on each column's exact distinct values and its other profile
expectations on a uniform sample; one volume check covers the row counts of all four tables.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from validation.batches import RowBatches, Source, distinct_values, sample
from validation.errors import ValidationFailed
from validation.gate import run_gate
from validation.params import ValidateParams
from validation.runner import Check
from validation.suites import (
    TABLES,
    build_profiles,
    build_suites,
    counts_distinct,
    derived_columns,
    parent_ids,
    profile_columns,
)
from validation.volume import volume_check

SITE = "towerflow_docs"


def read_schema(path: Path) -> dict[str, Any]:
    """schema.json, whose id dtypes decide the id type checks."""
    schema = json.loads(path.read_text())
    for key in ("user_id_dtype", "item_id_dtype"):
        if schema.get(key) not in ("int64", "string"):
            raise ValidationFailed(
                f"{path}: '{key}' must be 'int64' or 'string', got {schema.get(key)!r}")
    return schema


def table_checks(validate_cfg: ValidateParams, schema: dict[str, Any],
                 sources: dict[str, Source]) -> list[Check]:
    """A row check per table (batches with derived columns), an exact distinct-count check and a
    profile check on a sample (means)."""
    chunk_rows, sample_rows = validate_cfg.chunk_rows, validate_cfg.sample_rows
    suites, profiles = build_suites(schema, validate_cfg), build_profiles(schema, validate_cfg)
    parents = {"users": parent_ids(sources["users"], "user_id"),
               "items": parent_ids(sources["items"], "item_id")}
    checks = []
    for table, expectations in suites.items():
        source = sources[table]
        derived = derived_columns(table, sources, parents, chunk_rows)
        checks.append(Check(table, table, expectations, RowBatches(source, chunk_rows, derived)))
        exact = [e for e in profiles.get(table, []) if counts_distinct(e)]
        sampled = [e for e in profiles.get(table, []) if not counts_distinct(e)]
        if exact:
            cols, cap = profile_columns(exact), validate_cfg.categorical_cardinality[1] + 1
            checks.append(Check(table, f"{table}_distinct", exact,
                                lambda source=source, cols=cols, cap=cap: [
                                    distinct_values(source, cols, chunk_rows, cap)]))
        if sampled:
            cols = profile_columns(sampled)
            checks.append(Check(table, f"{table}_profile", sampled,
                                lambda source=source, cols=cols: [
                                    sample(source, cols, sample_rows, chunk_rows)]))
    return checks


def validate_contract(validate_cfg: ValidateParams, schema: dict[str, Any], sources: dict[str, Source],
                      context_root: Path, docs_dir: Path, summary_path: Path,
                      started: float | None = None) -> dict[str, Any]:
    """Validate the ingested tables (sources: one per name of TABLES) with their suites.

    Writes docs_dir/ (Data Docs, index.html) and summary_path on every run, pass or fail; the GX
    context lives in context_root/gx/, the row counts of the last run that passed in
    context_root/volume.json. Raises ValidationFailed (headline + one line per failed expectation,
    then the warnings) when the data must not go on; warnings alone are logged.
    """
    started = time.perf_counter() if started is None else started
    counts = {t: s.rows for t, s in sources.items()}
    checks = [*table_checks(validate_cfg, schema, sources), volume_check(counts)]
    # the events ingest added and quarantined (schema.json), shown beside the verdict (portal, run summary)
    extra = {"events": schema["events"]} if isinstance(schema.get("events"), dict) else None
    return run_gate(validate_cfg, checks, counts, context_root, SITE, docs_dir, summary_path,
                    started=started, extra=extra)
