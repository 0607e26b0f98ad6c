"""materialize: Feast offline sources, registry + online store, point-in-time training examples.

Reads `ingested/{users,items,interactions}.parquet` + `schema.json` and writes
- `features_dir/*.parquet`: the offline sources of the feature views (features/history.py);
- `feast_dir/registry.db` (its sources built for the offline store `features.offline_store`
  picks: file, duckdb or spark, features/store.py) + the online store (`feast_dir/online.db`, or Redis with
  `features.online_store: redis`; `feast_dir/online_store.json` records which): `apply` +
  `materialize` over the full time range, or on a rerun whose older rows are unchanged (only newer
  interactions appended) `materialize` of the new rows from the recorded end (features/refresh.py);
- after the online fill, the logged real-time events the ingested tables do not hold (newer than
  ingest's cursor, `ingested/events_cursor.json`) are replayed into the online store, once
  (flows/sources/events_replay.py), so a rematerialization does not lose them;
- `training_dir/examples.parquet`: one row per interaction, user features (static, recent_items and
  the behaviour counts) joined point-in-time by Feast (features/training_set.py), split by
  models/split.py; `training_dir/items.parquet`: the catalog read back from Feast;
  `training_dir/split.json`: split counts.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.definitions import RESERVED, USER_KEY, feature_columns, is_reserved
from features.history import write_sources
from features.params import FeaturesParams
from features.memory import high_water_mb, return_freed_memory
from features.refresh import fill_online
from features.store import import_feast_without_torch
from features.training_set import EXAMPLE_KEYS, count_columns, example_keys, item_catalog, write_training_examples
from flows.errors import DataContractError, MissingStageInput
from flows.portal.docs import localize_offline
from flows.sources.events_log import read_cursor
from flows.sources.events_replay import replay_events
from models.params import SplitParams
from models.split import temporal_split
from validation.params import EventRules
from validation.training_set import TrainingSetChecks, validate_training_set


PARTIAL = ".examples.partial.parquet"   # examples being built and checked, in training_dir


def _read_inputs(ingested: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    names = ["schema.json", "users.parquet", "items.parquet", "interactions.parquet"]
    missing = [n for n in names if not (ingested / n).exists()]
    if missing:
        raise MissingStageInput(f"{ingested}: missing {', '.join(missing)}; run `towerflow stage ingest`")
    schema = json.loads((ingested / "schema.json").read_text())
    users = pd.read_parquet(ingested / "users.parquet")
    items = pd.read_parquet(ingested / "items.parquet")
    inter = pd.read_parquet(ingested / "interactions.parquet", columns=EXAMPLE_KEYS)
    for side, table in (("user", users), ("item", items)):
        for col in feature_columns(schema, side):
            if is_reserved(col):
                raise DataContractError(f"{ingested / f'{side}s.parquet'}: feature column '{col}' "
                                        f"uses a reserved name ({', '.join(sorted(RESERVED))}, "
                                        f"interactions_<n>d, item_popularity_*); rename it")
            if col not in table.columns:
                raise DataContractError(f"{ingested / f'{side}s.parquet'}: schema.json lists feature "
                                        f"'{col}' but the table has no such column")
    if inter.empty:
        raise DataContractError(f"{ingested / 'interactions.parquet'}: no interactions")
    return schema, users, items, inter


def _split_summary(examples: pd.DataFrame, split_cfg: SplitParams) -> dict:
    test = examples["split"].to_numpy() == "test"
    return {
        "users": int(examples[USER_KEY].nunique()),
        "train_rows": int((~test).sum()),
        "test_rows": int(test.sum()),
        "users_evaluated": int(examples.loc[test, USER_KEY].nunique()),
        "test_fraction": split_cfg.test_fraction,
        "min_user_interactions": split_cfg.min_user_interactions,
    }


def _write(training_dir: Path, examples: Path, catalog: pa.Table, split: dict) -> None:
    """examples: the checked examples file, moved into place (same folder: an atomic rename)."""
    pq.write_table(catalog, training_dir / "items.parquet")
    (training_dir / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    os.replace(examples, training_dir / "examples.parquet")


def _check_split(examples: pd.DataFrame, split_cfg: SplitParams) -> None:
    """Evaluate scores the test rows and train learns from the train rows: without either, stop here,
    naming the setting, instead of after sample and train."""
    labels = set(examples["split"].unique())
    if "test" in labels and "train" in labels:
        return
    most = int(examples["user_id"].value_counts().max()) if len(examples) else 0
    if "test" not in labels:
        raise DataContractError(
            f"the temporal split has no test rows: only users with at least split.min_user_interactions="
            f"{split_cfg.min_user_interactions} interactions are held out, and the most any user has is {most}; "
            "lower split.min_user_interactions (or add data)")
    raise DataContractError(
        "the temporal split has no train rows: every user's interactions are all held out "
        f"(split.min_user_interactions={split_cfg.min_user_interactions}, the most any user has: {most}); "
        "raise split.min_user_interactions above 1")


def materialize(split_cfg: SplitParams, features_cfg: FeaturesParams, ingested: Path, features_dir: Path,
                feast_dir: Path, training_dir: Path, checks: TrainingSetChecks | None = None,
                assets_cache: Path | None = None, events_dir: Path | None = None,
                rules: EventRules | None = None) -> dict:
    """Build the Feast repo and the point-in-time training examples (see module docstring).

    With `checks`, the examples are validated (validation/training_set.py) before anything is
    written to training_dir: a failure raises ValidationFailed and leaves training_dir as it was.
    With assets_cache, those Data Docs load vendored assets only (flows/portal/docs.py). With
    events_dir and rules, the serving events newer than the ingested ones are replayed online.
    """
    started = time.perf_counter()
    # Nothing here uses torch, which Feast imports with itself unless hidden: 1.7-2.8 s of every
    # materialize process (a no-op where torch or Feast is already imported)
    import_feast_without_torch()
    timings: dict[str, float] = {}
    high_water: dict[str, float] = {}

    def done(step: str) -> None:
        # the step's seconds and the memory high-water at its end: the step where it grows holds the
        # stage's peak (issue 23 bounds it at 10M interactions)
        timings[step] = time.perf_counter() - started - sum(timings.values())
        high_water[step] = high_water_mb()

    schema, users, items, inter = _read_inputs(ingested)
    sources = write_sources(features_cfg, schema, users, items, inter, features_dir)
    done("sources")

    store, online = fill_online(features_cfg, schema, inter, sources, features_dir, feast_dir)
    cursor = read_cursor(ingested)
    replayed = {} if events_dir is None or rules is None or cursor is None else {"events_replayed": replay_events(
        store, events_dir, cursor, schema, rules, inter, (users[USER_KEY], items["item_id"]),
        features_cfg.history_length, features_cfg.count_windows_days)}
    done("online")

    examples = example_keys(inter)
    examples["split"] = temporal_split(examples, split_cfg).to_numpy()
    _check_split(examples, split_cfg)
    del inter, users            # the join holds slices of its own on top of what is held here
    return_freed_memory()
    # Built beside the old examples and moved over them only once checked: a failed check or a crash
    # leaves training_dir's examples as they were.
    training_dir.mkdir(parents=True, exist_ok=True)
    partial = training_dir / PARTIAL
    try:
        columns = write_training_examples(store, schema, examples, sources.history, features_dir, partial,
                                          features_cfg.join_rows).names
        catalog = item_catalog(store, schema, items, sources.now, features_dir)
        history_rows = sources.history.num_rows
        # the check forks its workers from this process: the join's history (1-2 GB at 10M) and the
        # heap the join freed are handed back first, or each worker's pages come on top of them
        del sources
        return_freed_memory()
        done("point_in_time_join")
        checked = {}
        if checks is not None:
            try:
                checked = {"validation_docs": validate_training_set(
                    checks.validate_cfg, partial, schema, ingested, count_columns(columns),
                    checks.context_root, checks.docs_dir)["docs"]}
            finally:
                if assets_cache is not None:
                    localize_offline(checks.docs_dir, assets_cache)
            done("validation")
        split = _split_summary(examples, split_cfg)
        _write(training_dir, partial, catalog, split)
    finally:
        partial.unlink(missing_ok=True)
    return {"examples": len(examples), "items": catalog.num_rows, "history_rows": history_rows,
            "online_materialization": online, "offline_store": store.config.offline_store.type,
            **replayed,
            **split, **checked, "seconds": round(time.perf_counter() - started, 2),
            "seconds_by_step": {k: round(v, 2) for k, v in timings.items()},
            "peak_rss_mb_after_step": high_water}
