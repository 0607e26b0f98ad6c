"""The training-set gate: the built training set, checked by materialize before it is written.

`materialize` calls `validate_training_set` on the examples file it has built (beside the old one) and
moves it to `examples.parquet` only when it passes, so a broken join never reaches sample/train (the contract
tables were checked by the validate stage before materialize started, validation/contract.py). Same
GX context, run (validation/gate.py) and severities as the contract gate; Data Docs go to their own
site (`reports/training_validation/`, an output of materialize) so that the two stages never write
each other's outputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from validation.batches import Derived, RowBatches, Source, sample
from validation.gate import run_gate
from validation.params import ValidateParams
from validation.runner import Check
from validation.suites import Expect, features, parent_ids, unknown_column
from validation.volume import volume_frame, volume_suite

TABLE = "training"
SITE = "towerflow_training_docs"
SPLITS = ["train", "test"]


@dataclass(frozen=True)
class TrainingSetChecks:
    """What materialize needs to validate the training set it built."""

    validate_cfg: ValidateParams
    context_root: Path  # the GX context's folder (paths.cache/gx), shared with the validate stage
    docs_dir: Path      # Data Docs + summary.json of this check (reports/training_validation)


def training_suites(schema: dict[str, Any], validate_cfg: ValidateParams,
                    counts: list[str] = ()) -> tuple[list, list, list]:
    """(row suite, profile suite, volume suite) of examples.parquet (docs/ARCHITECTURE.md).
    counts: its behaviour count columns (interactions_total first): never null or negative, and a
    window never counts more than the total."""
    e = Expect()
    feats = features(schema, "user")
    cols = [c for k in ("categorical", "numeric", "multi") for c in feats[k]]
    rows = [
        *e.exists(["user_id", "item_id", "timestamp", "weight", "split", "recent_items", *cols]),
        *e.not_null(["user_id", "item_id", "timestamp", "weight", "split"]),
        e.id_type("user_id", schema["user_id_dtype"]), e.id_type("item_id", schema["item_id_dtype"]),
        e.known(TABLE, "user_id", "users"), e.known(TABLE, "item_id", "items"),
        *e.timestamps("timestamp"),
        e("ExpectColumnValuesToBeBetween", "weight", "values", "negative weight", min_value=0),
        e("ExpectColumnValuesToBeInSet", "split", "values", f"split not in {SPLITS}", value_set=SPLITS),
        *[e.numeric(c) for c in feats["numeric"]],
        # Point-in-time features are null where Feast found no row at or before the timestamp.
        *e.null_share(cols, validate_cfg),
        *e.not_null(list(counts)),
        *[e("ExpectColumnValuesToBeBetween", c, "values", "negative count", min_value=0) for c in counts],
        *[e("ExpectColumnPairValuesAToBeGreaterThanB", c, "values", f"window count above {counts[0]}",
            column_A=counts[0], column_B=c, or_equal=True) for c in counts[1:]],
    ]
    profile = [e("ExpectColumnDistinctValuesToContainSet", "split", "distribution",
                 "the split has no train rows or no test rows", value_set=SPLITS)]
    volume = [
        e("ExpectColumnValuesToBeBetween", None, "values",
          "not one row per interaction ({interactions_rows} interactions)", column=TABLE,
          min_value={"$PARAMETER": "interactions_rows"}, max_value={"$PARAMETER": "interactions_rows"},
          meta={"table": TABLE, "template": True, "scalar": True}),
        *volume_suite([TABLE]),
    ]
    return rows, profile, volume


def validate_training_set(validate_cfg: ValidateParams, examples: Path, schema: dict[str, Any],
                          ingested: Path, count_columns: list[str], context_root: Path,
                          docs_dir: Path) -> dict[str, Any]:
    """Validate the examples file (read batch by batch) against the ingested ids.

    schema: ingested/schema.json as materialize read it (id dtypes, user feature columns).
    count_columns: the behaviour count columns of examples, interactions_total first.

    Writes docs_dir/ (Data Docs, index.html) and docs_dir/summary.json on every run, pass or fail;
    updates the training row count in context_root/volume.json when it passes. Raises
    ValidationFailed when the training set must not be written; warnings alone are logged.
    """
    started = time.perf_counter()
    chunk_rows = validate_cfg.chunk_rows
    source = Source(TABLE, path=examples)
    interactions = Source("interactions", path=ingested / "interactions.parquet").rows
    derived = Derived(references={
        unknown_column("user_id", "users"): ("user_id", parent_ids(Source("users", ingested / "users.parquet"), "user_id")),
        unknown_column("item_id", "items"): ("item_id", parent_ids(Source("items", ingested / "items.parquet"), "item_id")),
    })
    rows, profile, volume = training_suites(schema, validate_cfg, count_columns)
    checks = [
        Check(TABLE, TABLE, rows, RowBatches(source, chunk_rows, derived)),
        Check(TABLE, f"{TABLE}_profile", profile,
              lambda: [sample(source, ["split"], validate_cfg.sample_rows, chunk_rows)]),
        Check(TABLE, f"{TABLE}_volume", volume, lambda: [volume_frame({TABLE: source.rows})]),
    ]
    return run_gate(validate_cfg, checks, {TABLE: source.rows}, context_root, SITE, docs_dir,
                    docs_dir / "summary.json", parameters={"interactions_rows": interactions},
                    started=started, what="training set validation")
