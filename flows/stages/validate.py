"""Stage validate: check data/ingested/* with Great Expectations before anything learns from it."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.errors import MissingStageInput, ValidationFailed
from validation.params import ValidateParams

TABLES = ("users", "items", "interactions", "ranking_logs")
SITE = "towerflow_docs"


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


def validate(cfg: ValidateParams, ingested: Path, docs_dir: Path, summary_path: Path,
             context_root: Path) -> dict[str, Any]:
    """Validate the ingested tables with the GX suites of validation.suites.

    Writes docs_dir/ (GX Data Docs, index.html) on every run, pass or fail, and summary_path
    (per table: rows, expectations evaluated/failed/warned; the failures and the warnings). The GX
    context lives in context_root/gx/, the previous run's row counts in context_root/volume.json
    (updated only when the run passes). Raises ValidationFailed (headline + one line per failed
    expectation, then the warnings) when the data must not go on; warnings alone are logged.
    """
    from validation.batches import Source
    from validation.runner import run_checks
    from validation.summary import raise_or_warn, summarize
    from validation.suites import build_profiles, build_suites, suite_parameters
    from validation.volume import load_previous, save_counts, volume_parameters

    started = time.perf_counter()
    schema = load_schema(ingested)
    sources = {}
    for t in TABLES:
        path = ingested / f"{t}.parquet"
        if not path.exists():
            raise MissingStageInput(f"{path}: not found; run `towerflow stage ingest` first")
        sources[t] = Source(t, path=path)
    counts = {t: s.rows for t, s in sources.items()}
    checks = table_checks(sources, build_suites(schema, cfg), build_profiles(schema, cfg), cfg)
    checks.append(volume_check(counts))
    params = {**suite_parameters(datetime.now(timezone.utc), cfg),
              **volume_parameters(load_previous(context_root), list(TABLES), cfg)}
    stats, failures, index = run_checks(checks, params, cfg.severity.model_dump(), context_root, SITE, docs_dir)
    for t, n in counts.items():
        stats.setdefault(t, {})["rows"] = n
    summary = summarize(stats, failures, index, started)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if summary["success"]:
        save_counts(context_root, counts)
    raise_or_warn(failures, index)
    return summary


def table_checks(sources: dict, suites: dict[str, list], profiles: dict[str, list],
                 cfg: ValidateParams) -> list:
    """A row check per table (batches with derived columns), an exact distinct-count check and a
    profile check on a sample (means)."""
    from validation.batches import distinct_values, sample, to_pandas
    from validation.runner import Check
    from validation.suites import counts_distinct, derived_columns, parent_ids, profile_columns

    parents = {"users": parent_ids(sources["users"], "user_id"), "items": parent_ids(sources["items"], "item_id")}
    checks = []
    for table, expectations in suites.items():
        source = sources[table]
        derived = derived_columns(table, sources, parents, cfg.chunk_rows)

        def batches(source=source, derived=derived):  # noqa: ANN202 - bound per table
            return (derived.apply(to_pandas(b)) for b in source.batches(cfg.chunk_rows))
        checks.append(Check(table, table, expectations, batches))
        exact = [e for e in profiles.get(table, []) if counts_distinct(e)]
        sampled = [e for e in profiles.get(table, []) if not counts_distinct(e)]
        if exact:
            cols, cap = profile_columns(exact), cfg.categorical_cardinality[1] + 1
            checks.append(Check(table, f"{table}_distinct", exact,
                                lambda source=source, cols=cols, cap=cap: [
                                    distinct_values(source, cols, cfg.chunk_rows, cap)]))
        if sampled:
            cols = profile_columns(sampled)
            checks.append(Check(table, f"{table}_profile", sampled,
                                lambda source=source, cols=cols: [sample(source, cols, cfg.sample_rows,
                                                                         cfg.chunk_rows)]))
    return checks


def volume_check(counts: dict[str, int]):  # noqa: ANN201 - a validation.runner.Check
    from validation.runner import Check
    from validation.volume import SUITE, volume_frame, volume_suite

    return Check(SUITE, SUITE, volume_suite(list(counts)), lambda: [volume_frame(counts)])
