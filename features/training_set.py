"""The training set: each interaction with its user's features as of its time, joined point-in-time
by Feast `get_historical_features` from the offline store, and the item catalog as Feast serves it.

Per example: the static user features (user_static_fv) and the user_history_fv row in force
(recent_items and the behaviour counts). The lists are not joined by Feast itself: the join asks for
user_history_index_fv's scalar row number and takes the lists by position from the history table
(features/definitions.py says why).
"""
from __future__ import annotations

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
    ITEM_STATIC_FV,
    SOURCE_FILES,
    TIMESTAMP_FIELD,
    USER_HISTORY_FV,
    USER_HISTORY_INDEX_FV,
    USER_KEY,
    USER_STATIC_FV,
    is_count_column,
    item_static_refs,
    user_static_refs,
)
from features.history import expand_lists
from features.store import quiet_offline_reads
from models.arrays import sorted_unique

if TYPE_CHECKING:
    from feast import FeatureStore

EXAMPLE_KEYS = [USER_KEY, ITEM_KEY, "timestamp", "weight"]


def example_keys(interactions: pd.DataFrame) -> pd.DataFrame:
    """One row per interaction, in file order: user, item, timestamp (us, UTC) and weight."""
    examples = interactions[EXAMPLE_KEYS].reset_index(drop=True)
    examples["timestamp"] = examples["timestamp"].astype("datetime64[us, UTC]")
    return examples


def _chunks(entity_df: pd.DataFrame, key: str, max_pairs: int) -> np.ndarray:
    """Chunk id per entity row (sorted by key), about max_pairs (entity x feature rows) per chunk.

    The file store joins every entity row of a key with every feature row of that key before it
    filters by time, so a row of a user with d timestamps costs ~d rows and the user ~d^2. A chunk
    may cut a user's rows apart (each row's point-in-time answer depends on the feature rows alone):
    one heavy user (a bot, a shared account: 17k events) no longer makes one 300M-row join.
    """
    per_row = entity_df.groupby(key, sort=False)[key].transform("size").to_numpy().astype(np.int64)
    return (np.cumsum(per_row) - per_row) // max_pairs


def join_pairs(interactions: pd.DataFrame, key: str = USER_KEY) -> int:
    """The entity x feature rows of the training join over `interactions` (`_chunks`' count over the
    distinct (key, timestamp) rows: each key's rows squared, summed)."""
    per_key = interactions[[key, "timestamp"]].drop_duplicates().groupby(key, sort=False).size()
    return int((per_key.to_numpy(dtype=np.int64) ** 2).sum())


# Entity x feature rows per join call (`_chunks`), by offline store. Every store Feast has joins
# each entity row with every feature row of its key before it filters by time (DuckDB's and Spark's
# too: an inner join and a window, not an ASOF join), so one heavy user still makes d^2 rows. The
# file store holds them in pandas; DuckDB spills beyond features.duckdb_memory_limit and Spark
# beyond its executors' memory, so they take far larger calls (fewer fixed costs per call). DuckDB's
# process grows ~47 bytes a pair below its limit (1M interactions, 65M pairs: +2.4 GB at 50M pairs a
# call, +0.65 GB at 10M, 21% slower); 20M keeps a 10M-interaction materialize under 8 GB.
MAX_PAIRS = {"file": 2_000_000, "duckdb": 20_000_000, "spark": 50_000_000}


def historical(store: "FeatureStore", entity_df: pd.DataFrame, refs: list[str]) -> pd.DataFrame:
    """Feast's get_historical_features of entity_df as a frame."""
    with quiet_offline_reads():
        return store.get_historical_features(entity_df=entity_df, features=refs).to_df()


def point_in_time(store: "FeatureStore", keys: pd.DataFrame, refs: list[str],
                  max_pairs: int | None = None, key: str = USER_KEY) -> pd.DataFrame:
    """Features `refs` of each (key, timestamp) row of keys as of its timestamp, row-aligned; a row
    with no feature row at or before its time (within the view's TTL) gets nulls.

    Feast's file store collapses entity rows with the same key and timestamp (feast#6787), so the
    join runs on the distinct (key, timestamp) pairs and is mapped back by position, in calls of
    about max_pairs entity x feature rows (`_chunks`; default MAX_PAIRS of the store).
    """
    keys = keys[[key, "timestamp"]].reset_index(drop=True)
    group = keys.groupby([key, "timestamp"], sort=False).ngroup().to_numpy()
    entity_df = keys.drop_duplicates(ignore_index=True).rename(columns={"timestamp": TIMESTAMP_FIELD})
    n_pairs = len(entity_df)
    entity_df["__row"] = np.arange(n_pairs)
    max_pairs = max_pairs or MAX_PAIRS[store.config.offline_store.type]
    entity_df = entity_df.sort_values([key, TIMESTAMP_FIELD], kind="mergesort", ignore_index=True)
    parts = [historical(store, chunk, refs)
             for _, chunk in entity_df.groupby(_chunks(entity_df, key, max_pairs), sort=True)]
    joined = pd.concat(parts, ignore_index=True)
    rows = joined["__row"].to_numpy()
    if len(sorted_unique(rows)) != len(rows) or len(rows) > n_pairs:
        raise RuntimeError(f"Feast point-in-time join returned {len(joined)} rows (some twice) for "
                           f"{n_pairs} distinct ({key}, timestamp) pairs")
    # The file store drops a pair whose feature rows all postdate it (or lie beyond the TTL);
    # DuckDB and Spark return it with nulls. Both become nulls here, so every store gives the same
    # row-aligned answer and the examples never silently shrink.
    names = [r.split(":", 1)[1] for r in refs]
    joined = joined.set_index("__row")[names]
    if len(joined) < n_pairs:
        joined = joined.reindex(np.arange(n_pairs))
    else:
        joined = joined.sort_index()
    return joined.iloc[group].reset_index(drop=True)


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
    return joined, expand_lists(behaviour.take(pa.array(row.to_numpy(dtype=np.int64))).combine_chunks())


def training_examples(store: "FeatureStore", schema: dict, examples: pd.DataFrame,
                      history: pa.Table, features_dir: Path) -> pa.Table:
    """examples (keys, weight, split) + the user features as of each timestamp, typed like the
    offline sources; history: the rows of user_history_fv's source, in file order."""
    static, behaviour = _user_features(store, schema, examples, history)
    types = {"split": pa.string(), **_source_types(features_dir, USER_STATIC_FV)}
    table = _arrow(pd.concat([examples, static], axis=1), types)
    for name in behaviour.column_names:
        table = table.append_column(name, behaviour.column(name))
    return table


def write_training_examples(store: "FeatureStore", schema: dict, examples: pd.DataFrame, history: pa.Table,
                            features_dir: Path, out: Path, slice_rows: int) -> pa.Schema:
    """`training_examples` of examples, slice_rows examples at a time (in order), each slice written to
    the parquet file `out` as its own row group: memory holds one slice's joined features and history
    lists, not every example's (at 10M examples of string ids the lists alone were several GB)."""
    writer: pq.ParquetWriter | None = None
    try:
        for start in range(0, max(len(examples), 1), slice_rows):
            part = examples.iloc[start:start + slice_rows].reset_index(drop=True)
            table = training_examples(store, schema, part, history, features_dir)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table.cast(writer.schema), row_group_size=max(table.num_rows, 1))
    finally:
        if writer is not None:
            writer.close()
    assert writer is not None   # the loop runs at least once
    return writer.schema


def item_catalog(store: "FeatureStore", schema: dict, items: pd.DataFrame, at: pd.Timestamp,
                 features_dir: Path) -> pa.Table:
    """items.parquet's rows with their features as Feast serves them (no TTL: any time works)."""
    refs = item_static_refs(schema)
    if not refs:
        catalog = items[[ITEM_KEY]].reset_index(drop=True)
    else:
        entity_df = pd.DataFrame({ITEM_KEY: items[ITEM_KEY].to_numpy(), TIMESTAMP_FIELD: at,
                                  "__row": np.arange(len(items))})
        joined = historical(store, entity_df, refs)
        if len(joined) != len(items) or joined["__row"].nunique() != len(items):
            raise RuntimeError(f"Feast returned {len(joined)} catalog rows for {len(items)} items")
        joined = joined.sort_values("__row", ignore_index=True)
        catalog = joined[[ITEM_KEY, *[r.split(":", 1)[1] for r in refs]]]
    return _arrow(catalog, _source_types(features_dir, ITEM_STATIC_FV))


def count_columns(columns: list[str]) -> list[str]:
    """The behaviour count columns among `columns`, interactions_total first (the training-set
    checks bound each window by the total)."""
    return sorted((c for c in columns if is_count_column(c)), key=lambda c: c != INTERACTIONS_TOTAL)


def _arrow(frame: pd.DataFrame, types: dict[str, pa.DataType]) -> pa.Table:
    """frame as arrow with the source column types (Feast hands back numpy arrays, widened ints)."""
    fields = [pa.field(c, types[c]) if c in types else
              pa.Schema.from_pandas(frame[[c]], preserve_index=False).field(c) for c in frame.columns]
    return pa.Table.from_pandas(frame, schema=pa.schema(fields), preserve_index=False)


def _source_types(features_dir: Path, view: str) -> dict[str, pa.DataType]:
    schema = pq.read_schema(features_dir / SOURCE_FILES[view])
    return {f.name: f.type for f in schema if f.name != TIMESTAMP_FIELD}
