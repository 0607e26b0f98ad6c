"""materialize: Feast offline sources, registry + online store, point-in-time training examples.

Reads `ingested/{users,items,interactions}.parquet` + `schema.json` and writes
- `features_dir/*.parquet`: the offline sources of the four feature views (features/definitions.py);
- `feast_dir/registry.db` + the online store (`feast_dir/online.db`, or Redis with
  `features.online_store: redis`; `feast_dir/online_store.json` records which): `apply` +
  `materialize` over the full time range, or on a rerun whose older rows are unchanged (only newer
  interactions appended) `materialize_incremental` of the new rows (features/refresh.py);
- `training_dir/examples.parquet`: one row per interaction, user features (static, recent_items and
  the behaviour counts) joined point-in-time by Feast `get_historical_features`; `training_dir/items.parquet`: the catalog read back from Feast;
  `training_dir/split.json`: split counts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.definitions import (
    HISTORY_ROW,
    INTERACTIONS_TOTAL,
    ITEM_KEY,
    ITEM_POPULARITY_FV,
    ITEM_STATIC_FV,
    RECENT_ITEMS,
    SEEN_ITEMS,
    SOURCE_FILES,
    TIMESTAMP_FIELD,
    USER_HISTORY_FV,
    USER_HISTORY_INDEX_FV,
    USER_KEY,
    USER_SEEN_FV,
    USER_STATIC_FV,
    feature_columns,
    item_static_refs,
    user_static_refs,
)
from features.history import (
    NOW_OFFSET,
    STATIC_LEAD,
    history_index_rows,
    history_rows,
    item_popularity_rows,
    seen_rows,
    static_rows,
)
from features.params import FeaturesParams
from flows.errors import DataContractError, MissingStageInput
from models.params import SplitParams
from models.split import temporal_split

if TYPE_CHECKING:
    from feast import FeatureStore

    from validation.training import TrainingChecks

# Names the stage adds to examples.parquet or Feast uses itself: a feature may not take them.
_RESERVED = {USER_KEY, ITEM_KEY, "timestamp", "weight", "split", RECENT_ITEMS, SEEN_ITEMS,
             HISTORY_ROW, TIMESTAMP_FIELD, "__row", INTERACTIONS_TOTAL}


def _reserved(column: str) -> bool:
    from features.definitions import is_count_column

    return column in _RESERVED or is_count_column(column) or column.startswith("item_popularity_")


def _read_inputs(ingested: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    names = ["schema.json", "users.parquet", "items.parquet", "interactions.parquet"]
    missing = [n for n in names if not (ingested / n).exists()]
    if missing:
        raise MissingStageInput(f"{ingested}: missing {', '.join(missing)}; run `towerflow stage ingest`")
    schema = json.loads((ingested / "schema.json").read_text())
    users = pd.read_parquet(ingested / "users.parquet")
    items = pd.read_parquet(ingested / "items.parquet")
    inter = pd.read_parquet(ingested / "interactions.parquet",
                            columns=[USER_KEY, ITEM_KEY, "timestamp", "weight"])
    for side, table in (("user", users), ("item", items)):
        for col in feature_columns(schema, side):
            if _reserved(col):
                raise DataContractError(f"{ingested / f'{side}s.parquet'}: feature column '{col}' "
                                        f"uses a reserved name ({', '.join(sorted(_RESERVED))}, "
                                        f"interactions_<n>d, item_popularity_*); rename it")
            if col not in table.columns:
                raise DataContractError(f"{ingested / f'{side}s.parquet'}: schema.json lists feature "
                                        f"'{col}' but the table has no such column")
    if inter.empty:
        raise DataContractError(f"{ingested / 'interactions.parquet'}: no interactions")
    return schema, users, items, inter


def _write_sources(schema: dict, users: pd.DataFrame, items: pd.DataFrame, inter: pd.DataFrame,
                   feats: FeaturesParams, features_dir: Path) -> tuple[pd.Timestamp, pa.Table]:
    """Write the offline sources; return the static rows' time and the history table."""
    features_dir.mkdir(parents=True, exist_ok=True)
    static_at = inter["timestamp"].min() - STATIC_LEAD
    windows = feats.count_windows_days
    history = history_rows(inter, feats.history_length, windows)
    tables = {
        USER_STATIC_FV: static_rows(users, USER_KEY, feature_columns(schema, "user"), static_at),
        ITEM_STATIC_FV: static_rows(items, ITEM_KEY, feature_columns(schema, "item"), static_at),
        USER_HISTORY_FV: history,
        USER_HISTORY_INDEX_FV: history_index_rows(history),
        USER_SEEN_FV: seen_rows(inter),
        ITEM_POPULARITY_FV: item_popularity_rows(inter, windows, items[ITEM_KEY].to_numpy(), static_at),
    }
    for name, table in tables.items():
        pq.write_table(table, features_dir / SOURCE_FILES[name])
    return static_at, history


def _fresh_store(schema: dict, feast_dir: Path, features_dir: Path,
                 feats: FeaturesParams) -> "FeatureStore":
    """A new registry + online store: a stale view or row from an earlier run must not survive."""
    from features.definitions import build_repo
    from features.store import open_store, reset_online

    (feast_dir / "registry.db").unlink(missing_ok=True)
    reset_online(feast_dir, features_dir, feats.online_store)
    store = open_store(feast_dir, features_dir, feats.online_store)
    store.apply(build_repo(schema, features_dir).objects())
    return store


def _fill_online(schema: dict, inter: pd.DataFrame, feats: FeaturesParams, features_dir: Path,
                 feast_dir: Path, static_at: pd.Timestamp, end: pd.Timestamp) -> tuple["FeatureStore", str]:
    """Bring the registry + online store up to `end` (exclusive): incrementally when the rows
    already online are still right (features/refresh.py), else rebuilt over the full range."""
    from features import refresh
    from features.store import open_store

    definition = refresh.definition_digest(schema, features_dir, feats.history_length,
                                           feats.online_store)
    static = refresh.static_digest(features_dir)
    how, _ = refresh.plan(feast_dir, feats.online_store, definition, static, inter, end)
    # Forget the old state first: a run that dies mid-write must rebuild next time.
    (feast_dir / refresh.STATE_FILE).unlink(missing_ok=True)
    if how == "full":
        store = _fresh_store(schema, feast_dir, features_dir, feats)
        store.materialize(start_date=static_at.to_pydatetime(), end_date=end.to_pydatetime())
    else:
        store = open_store(feast_dir, features_dir, feats.online_store)
        if how == "incremental":
            # From each view's last materialized end (in the registry) to the new end.
            store.materialize_incremental(end_date=end.to_pydatetime())
    refresh.record(feast_dir, definition, static, inter, end)
    return store, how


def _chunks(entity_df: pd.DataFrame, key: str, max_pairs: int) -> np.ndarray:
    """Chunk id per entity row, whole entities per chunk, about max_pairs (entity x feature rows) each.

    The file store joins every entity row of a key with every feature row of that key before it
    filters by time, so a user with d timestamps costs ~d^2 rows; chunks bound that memory.
    """
    per_key = entity_df.groupby(key, sort=False)[key].transform("size").to_numpy()
    first = ~entity_df[key].duplicated().to_numpy()
    cost = np.where(first, per_key.astype(np.int64) * (per_key + 1), 0)
    return np.cumsum(cost) // max_pairs


def point_in_time(store: "FeatureStore", keys: pd.DataFrame, refs: list[str],
                  max_pairs: int = 2_000_000, key: str = USER_KEY) -> pd.DataFrame:
    """Features `refs` of each (key, timestamp) row of keys as of its timestamp, row-aligned.

    Feast's file store collapses entity rows with the same key and timestamp (feast#6787), so the
    join runs on the distinct (key, timestamp) pairs and is mapped back by position.
    """
    keys = keys[[key, "timestamp"]].reset_index(drop=True)
    group = keys.groupby([key, "timestamp"], sort=False).ngroup().to_numpy()
    entity_df = keys.drop_duplicates(ignore_index=True).rename(columns={"timestamp": TIMESTAMP_FIELD})
    entity_df["__row"] = np.arange(len(entity_df))
    entity_df = entity_df.sort_values([key, TIMESTAMP_FIELD], kind="mergesort", ignore_index=True)
    parts = [store.get_historical_features(entity_df=chunk, features=refs).to_df()
             for _, chunk in entity_df.groupby(_chunks(entity_df, key, max_pairs), sort=True)]
    joined = pd.concat(parts, ignore_index=True)
    # An entity row whose feature rows all postdate it is dropped by Feast, not returned as NaN:
    # every pair must come back exactly once or the examples would silently shrink.
    rows = np.sort(joined["__row"].to_numpy())
    if len(rows) != len(entity_df) or not np.array_equal(rows, np.arange(len(entity_df))):
        raise RuntimeError(f"Feast point-in-time join returned {len(joined)} rows for "
                           f"{len(entity_df)} distinct (user, timestamp) pairs")
    joined = joined.sort_values("__row", ignore_index=True)
    names = [r.split(":", 1)[1] for r in refs]
    return joined[names].iloc[group].reset_index(drop=True)


def _user_features(store: "FeatureStore", schema: dict, examples: pd.DataFrame,
                   history: pa.Table) -> tuple[pd.DataFrame, pa.Table]:
    """Static user features of each example and its user_history_fv row (recent_items + counts),
    as of its timestamp."""
    index_ref = f"{USER_HISTORY_INDEX_FV}:{HISTORY_ROW}"
    joined = point_in_time(store, examples, [*user_static_refs(schema), index_ref])
    row = joined.pop(HISTORY_ROW)
    # Every user has a history row dated at their first interaction, so none may be missing.
    if row.isna().any():
        raise RuntimeError(f"{int(row.isna().sum())} examples found no {USER_HISTORY_FV} row")
    behaviour = history.drop_columns([USER_KEY, TIMESTAMP_FIELD])
    return joined, behaviour.take(pa.array(row.to_numpy(dtype=np.int64))).combine_chunks()


def _item_catalog(store: "FeatureStore", schema: dict, items: pd.DataFrame,
                  at: pd.Timestamp) -> pd.DataFrame:
    """items.parquet's rows with their features as Feast serves them (no TTL: any time works)."""
    refs = item_static_refs(schema)
    if not refs:
        return items[[ITEM_KEY]].reset_index(drop=True)
    entity_df = pd.DataFrame({ITEM_KEY: items[ITEM_KEY].to_numpy(), TIMESTAMP_FIELD: at,
                              "__row": np.arange(len(items))})
    joined = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    if len(joined) != len(items) or joined["__row"].nunique() != len(items):
        raise RuntimeError(f"Feast returned {len(joined)} catalog rows for {len(items)} items")
    joined = joined.sort_values("__row", ignore_index=True)
    return joined[[ITEM_KEY, *[r.split(":", 1)[1] for r in refs]]]


def _arrow(frame: pd.DataFrame, types: dict[str, pa.DataType]) -> pa.Table:
    """frame as arrow with the source column types (Feast hands back numpy arrays, widened ints)."""
    fields = [pa.field(c, types[c]) if c in types else
              pa.Schema.from_pandas(frame[[c]], preserve_index=False).field(c) for c in frame.columns]
    return pa.Table.from_pandas(frame, schema=pa.schema(fields), preserve_index=False)


def _source_types(features_dir: Path, view: str) -> dict[str, pa.DataType]:
    schema = pq.read_schema(features_dir / SOURCE_FILES[view])
    return {f.name: f.type for f in schema if f.name != TIMESTAMP_FIELD}


def _split_summary(inter: pd.DataFrame, split: pd.Series, cfg: SplitParams) -> dict:
    test = split.to_numpy() == "test"
    return {
        "users": int(inter[USER_KEY].nunique()),
        "train_rows": int((~test).sum()),
        "test_rows": int(test.sum()),
        "users_evaluated": int(inter.loc[test, USER_KEY].nunique()),
        "test_fraction": cfg.test_fraction,
        "min_user_interactions": cfg.min_user_interactions,
    }


def materialize(ingested: Path, split: SplitParams, feats: FeaturesParams, features_dir: Path,
                feast_dir: Path, training_dir: Path, checks: "TrainingChecks | None" = None) -> dict:
    """Build the Feast repo and the point-in-time training examples (see module docstring).

    With `checks`, the examples are validated (validation/training.py) before anything is written
    to training_dir: a failure raises ValidationFailed and leaves training_dir as it was.
    """
    started = time.perf_counter()
    schema, users, items, inter = _read_inputs(ingested)
    static_at, history = _write_sources(schema, users, items, inter, feats, features_dir)
    timings = {"sources": time.perf_counter() - started}

    latest = inter["timestamp"].max() + NOW_OFFSET
    store, online = _fill_online(schema, inter, feats, features_dir, feast_dir, static_at,
                                 end=latest + pd.Timedelta(seconds=1))
    timings["online"] = time.perf_counter() - started - timings["sources"]

    examples = inter[[USER_KEY, ITEM_KEY, "timestamp", "weight"]].reset_index(drop=True)
    examples["timestamp"] = examples["timestamp"].astype("datetime64[us, UTC]")
    examples["split"] = temporal_split(examples, split).to_numpy()
    static, behaviour = _user_features(store, schema, examples, history)
    types = {"split": pa.string(), **_source_types(features_dir, USER_STATIC_FV)}
    table = _arrow(pd.concat([examples, static], axis=1), types)
    for name in behaviour.column_names:
        table = table.append_column(name, behaviour.column(name))
    catalog = _item_catalog(store, schema, items, latest)
    timings["point_in_time_join"] = time.perf_counter() - started - sum(timings.values())
    checked = {}
    if checks is not None:
        from validation.training import validate_training_set
        checked = {"validation_docs": validate_training_set(
            checks.cfg, table, schema, ingested, checks.context_root, checks.docs_dir)["docs"]}

    training_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, training_dir / "examples.parquet")
    pq.write_table(_arrow(catalog, _source_types(features_dir, ITEM_STATIC_FV)),
                   training_dir / "items.parquet")
    counts = _split_summary(examples, examples["split"], split)
    (training_dir / "split.json").write_text(json.dumps(counts, indent=2) + "\n")
    return {"examples": len(examples), "items": len(catalog), "history_rows": history.num_rows,
            "online_materialization": online,
            **counts, **checked, "seconds": round(time.perf_counter() - started, 2),
            "seconds_by_step": {k: round(v, 2) for k, v in timings.items()}}
