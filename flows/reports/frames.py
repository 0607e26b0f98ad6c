"""Stage report: Evidently data drift between the training period and the holdout.

Each row is one interaction described by what a retrieval model is sensitive to: the rating/weight,
how popular the item was in the training period, the item's own features, the user's features at the
time, and when it happened (hour of day, day of week). Reference = split 'train', current = 'test'.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

from flows.errors import DataContractError, MissingStageInput
from flows.params import ReportParams

KEYS = ["user_id", "item_id", "timestamp"]
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
MISSING = "<missing>"


def _read_parquet(path: Path, upstream: str) -> pd.DataFrame:
    if not path.is_file():
        raise MissingStageInput(f"{path}: not found; run the {upstream} stage first")
    return pd.read_parquet(path)


def _utc(ts: pd.Series) -> pd.Series:
    return pd.to_datetime(ts, utc=True).astype("datetime64[us, UTC]")


def interaction_frame(examples: pd.DataFrame, items: pd.DataFrame, interactions: pd.DataFrame | None,
                      schema: dict[str, Any]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """One row per example: (frame, numeric columns, categorical columns); ids are left out."""
    train = (examples["split"] == "train").to_numpy()
    out = pd.DataFrame(index=examples.index)
    num: list[str] = []
    cat: list[str] = []

    if "weight" in examples.columns:
        out["weight"] = examples["weight"].astype("float64")
        num.append("weight")
    if interactions is not None and "rating" in interactions.columns:
        ratings = interactions[KEYS + ["rating"]].assign(timestamp=lambda d: _utc(d["timestamp"]))
        ratings = ratings.drop_duplicates(KEYS, keep="last")
        keyed = examples[KEYS].assign(timestamp=_utc(examples["timestamp"]))
        joined = keyed.merge(ratings, on=KEYS, how="left", validate="many_to_one")
        out["rating"] = joined["rating"].to_numpy(dtype="float64")
        num.append("rating")

    # Popularity as known at training time: drift here means the holdout favours other items.
    train_counts = examples.loc[train, "item_id"].value_counts()
    out["item_popularity"] = np.log1p(examples["item_id"].map(train_counts).fillna(0).to_numpy(dtype="float64"))
    num.append("item_popularity")

    item_kinds = schema.get("item_features", {})
    item_cols = [c for c in item_kinds.get("numeric", []) + item_kinds.get("categorical", []) if c in items.columns]
    by_item = items.drop_duplicates("item_id").set_index("item_id")[item_cols]
    joined_items = by_item.reindex(examples["item_id"].to_numpy())
    for col in item_kinds.get("numeric", []):
        if col in joined_items.columns:
            out[f"item_{col}"] = pd.to_numeric(joined_items[col], errors="coerce").to_numpy(dtype="float64")
            num.append(f"item_{col}")
    for col in item_kinds.get("categorical", []):
        if col in joined_items.columns:
            out[f"item_{col}"] = _categorical(joined_items[col]).to_numpy()
            cat.append(f"item_{col}")

    user_kinds = schema.get("user_features", {})
    for col in user_kinds.get("numeric", []):
        if col in examples.columns:
            out[f"user_{col}"] = pd.to_numeric(examples[col], errors="coerce").astype("float64")
            num.append(f"user_{col}")
    for col in user_kinds.get("categorical", []):
        if col in examples.columns:
            out[f"user_{col}"] = _categorical(examples[col])
            cat.append(f"user_{col}")

    ts = _utc(examples["timestamp"])
    out["hour_of_day"] = ts.dt.hour.astype("float64")
    num.append("hour_of_day")
    out["day_of_week"] = ts.dt.dayofweek.map(dict(enumerate(DAYS)))
    cat.append("day_of_week")
    return out, num, cat


def _categorical(values: pd.Series) -> pd.Series:
    # Strings with an explicit missing level, so a change in missingness shows up as drift too.
    return values.astype(object).where(values.notna(), MISSING).astype(str)


def _informative(ref: pd.DataFrame, cur: pd.DataFrame, columns: list[str]) -> list[str]:
    """Columns with more than one value across both periods (a constant column cannot drift and
    makes the statistical tests divide by zero)."""
    both = pd.concat([ref[columns], cur[columns]])
    return [c for c in columns if both[c].nunique(dropna=True) > 1]


def report(report_cfg: ReportParams, ingested: Path, training_dir: Path, out_dir: Path) -> dict:
    """Evidently DataDriftPreset of training-period vs holdout interactions.

    Writes out_dir/drift.html, out_dir/drift.json (the Evidently snapshot) and out_dir/summary.json
    (drift share, drifted columns, dataset_drift = share >= report_cfg.drift_share_threshold).
    """
    examples_path = training_dir / "examples.parquet"
    examples = _read_parquet(examples_path, "materialize")
    items = _read_parquet(training_dir / "items.parquet", "materialize")
    schema_path = ingested / "schema.json"
    if not schema_path.is_file():
        raise MissingStageInput(f"{schema_path}: not found; run the ingest stage first")
    schema = json.loads(schema_path.read_text())
    interactions = None
    if schema.get("has_rating"):
        interactions = _read_parquet(ingested / "interactions.parquet", "ingest")
    for col in KEYS + ["split"]:
        if col not in examples.columns:
            raise DataContractError(f"{examples_path}: column '{col}' is missing")

    frame, num, cat = interaction_frame(examples, items, interactions, schema)
    ref = frame[(examples["split"] == "train").to_numpy()].reset_index(drop=True)
    cur = frame[(examples["split"] == "test").to_numpy()].reset_index(drop=True)
    if ref.empty or cur.empty:
        raise DataContractError(f"{examples_path}: drift needs rows in both splits "
                                f"(train: {len(ref)}, test: {len(cur)})")
    num, cat = _informative(ref, cur, num), _informative(ref, cur, cat)
    if not num + cat:
        raise DataContractError(f"{examples_path}: no column varies, nothing to compare for drift")

    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    report_ = Report([DataDriftPreset(drift_share=report_cfg.drift_share_threshold)], include_tests=True)
    with warnings.catch_warnings():
        # Evidently correlates columns for its plots; a column that is constant within one period
        # (legitimately: that is drift) makes numpy warn about 0/0 there.
        warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
        snapshot = report_.run(Dataset.from_pandas(cur[num + cat], data_definition=definition),
                               Dataset.from_pandas(ref[num + cat], data_definition=definition))
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out_dir / "drift.html"))
    snapshot.save_json(str(out_dir / "drift.json"))

    summary = summarize(snapshot.dict(), report_cfg.drift_share_threshold)
    summary.update(reference_rows=len(ref), current_rows=len(cur))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(snapshot: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Drift share from DriftedColumnsCount; per column, Evidently's own verdict (its 'drift' test
    FAILs when drift is detected, whichever direction the method's score runs)."""
    share = None
    columns: dict[str, dict[str, Any]] = {}
    for m in snapshot["metrics"]:
        config = m.get("config", {})
        if config.get("type", "").endswith("DriftedColumnsCount"):
            share = float(m["value"]["share"])
        elif config.get("type", "").endswith("ValueDrift"):
            columns[config["column"]] = {"method": config.get("method"), "threshold": config.get("threshold"),
                                         "score": float(m["value"]), "drifted": False}
    for t in snapshot.get("tests", []):
        params = t.get("metric_config", {}).get("params", {})
        if params.get("type", "").endswith("ValueDrift") and params.get("column") in columns:
            columns[params["column"]]["drifted"] = t.get("status") == "FAIL"
    if share is None:
        raise DataContractError("Evidently's report has no DriftedColumnsCount metric")
    drifted = sorted(c for c, v in columns.items() if v["drifted"])
    return {
        "drift_share": share,
        "n_columns": len(columns),
        "n_drifted": len(drifted),
        "drifted_columns": drifted,
        "threshold": threshold,
        "dataset_drift": share >= threshold,
        "columns": columns,
    }
