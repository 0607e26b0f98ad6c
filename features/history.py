"""Rows of the Feast offline sources, built from the ingested tables (vectorized, arrow list columns).

Point-in-time rule of the behaviour view: the row dated t for a user holds the items (and counts) of
the user's interactions strictly before t. Feast's file store takes, for an example at time T, the
newest row dated <= T, i.e. the row dated T itself, so an example never sees its own item or anything
later. Item popularity rows are dated at UTC midnights and count whole days before that midnight.
`write_sources` writes every view's source into features_dir (features/definitions.py names them).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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
    item_popularity_columns,
    user_count_columns,
)
from features.params import FeaturesParams
from models.arrays import micros, run_begins, run_start, search_sorted, sorted_unique

# How far after a user's last interaction the "now" history row is dated: strictly after every
# interaction of that user, so no training example can pick it up.
NOW_OFFSET = timedelta(seconds=1)
# Static rows are dated this long before the first interaction so every example finds them.
STATIC_LEAD = timedelta(days=1)
_TS_TYPE = pa.timestamp("us", tz="UTC")
_NOW_US = NOW_OFFSET // timedelta(microseconds=1)
_DAY_US = timedelta(days=1) // timedelta(microseconds=1)


def _id_array(values: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.int64() if values.dtype.kind in "iu" else pa.string())


def _ts_array(us: np.ndarray) -> pa.Array:
    return pa.array(us.astype("int64"), type=pa.int64()).cast(_TS_TYPE)


def static_rows(table: pd.DataFrame, key: str, columns: list[str], at: pd.Timestamp) -> pa.Table:
    """key + feature columns + one early event_timestamp; integer columns widened to int64."""
    out = pa.Table.from_pandas(table[[key, *columns]], preserve_index=False)
    for i, field in enumerate(out.schema):
        if pa.types.is_integer(field.type) and field.type != pa.int64():
            out = out.set_column(i, field.name, out.column(i).cast(pa.int64()))
    stamp = pa.array(np.full(len(out), micros(pd.Series([at]))[0]), type=pa.int64()).cast(_TS_TYPE)
    return out.append_column(TIMESTAMP_FIELD, stamp)


@dataclass(frozen=True)
class _Coded:
    """Interactions in (user, time, item id) order, the order of models.split, each id as its code in
    the sorted distinct ids: every sort and grouping below runs on integers (sorting 10M string ids
    took 14 s, twice, of the 10M sources step's 128 s; converting id objects to arrow 11 s more)."""

    user: np.ndarray      # codes into users, rows in order
    item: np.ndarray      # codes into items
    ts: np.ndarray        # int64 microseconds (UTC)
    users: pa.Array       # the distinct user ids, sorted
    items: pa.Array       # the distinct item ids, sorted


def _coded(interactions: pd.DataFrame) -> _Coded:
    user, users = pd.factorize(interactions[USER_KEY], sort=True)
    item, items = pd.factorize(interactions[ITEM_KEY], sort=True)
    # the column's own resolution orders the ties that whole microseconds would make
    exact = pd.to_datetime(interactions["timestamp"], utc=True).astype("int64").to_numpy()
    order = np.lexsort((item, exact, user))
    return _Coded(user[order], item[order], micros(interactions["timestamp"])[order],
                  _id_array(np.asarray(users)), _id_array(np.asarray(items)))


def _windows(ids: pa.Array, codes: np.ndarray, cut: np.ndarray, start: np.ndarray,
             length: int) -> pa.Array:
    """list<id> per row: ids[codes[cut-1]], ids[codes[cut-2]], ... down to max(start, cut-length),
    its values dictionary-coded (int32 codes into ids; `expand_lists` gives plain lists)."""
    lengths = np.minimum(cut - start, length)
    offsets = np.zeros(len(cut) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    flat = np.repeat(cut - 1, lengths) - within
    values = pa.DictionaryArray.from_arrays(pa.array(codes[flat].astype(np.int32)), ids)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _position_before(user: np.ndarray, ts: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """For interactions in (user, time) order: a function of queries (user code, time) giving the
    position of the first of that user's rows dated at or after the time, so the rows before it
    from the user's first are those strictly before (binary searches on one integer key per row, the
    user and the rank of its time; merge_asof per count window took 16.6 s of 10M's 82 s)."""
    times = sorted_unique(ts)
    span = np.int64(len(times) + 1)
    keys = user.astype(np.int64) * span + search_sorted(times, ts)       # ascending

    def position(q_user: np.ndarray, q_ts: np.ndarray) -> np.ndarray:
        return search_sorted(keys, q_user.astype(np.int64) * span + search_sorted(times, q_ts))

    return position


def history_rows(interactions: pd.DataFrame, history_length: int,
                 windows: tuple[int, ...] = ()) -> pa.Table:
    """One row per (user, distinct interaction time) + one "now" row per user (see module doc):
    recent_items, interactions_total and interactions_<w>d (dated in [t - w days, t))."""
    return expand_lists(_history_table(_coded(interactions), history_length, windows))


def _history_table(df: _Coded, history_length: int, windows: tuple[int, ...]) -> pa.Table:
    """history_rows with its lists dictionary-coded (what the training join holds)."""
    users, ts = df.user, df.ts
    n = len(users)
    new_user = run_begins(users)
    new_time = new_user | run_begins(ts)
    user_start = run_start(new_user)

    first = np.flatnonzero(new_time)                      # first row of each (user, time) group
    starts = np.flatnonzero(new_user)
    ends = np.append(starts[1:], n)                       # one past each user's last row
    cut = np.concatenate([first, ends])
    start = np.concatenate([user_start[first], starts])
    stamp = np.concatenate([ts[first], ts[ends - 1] + _NOW_US])
    total = cut - start
    columns = {
        USER_KEY: df.users.take(pa.array(users[start])),
        RECENT_ITEMS: _windows(df.items, df.item, cut, start, history_length),
        INTERACTIONS_TOTAL: pa.array(total.astype(np.int64)),
    }
    before = _position_before(users, ts)
    for days, name in zip(windows, user_count_columns(windows)[1:]):
        older = before(users[start], stamp - days * _DAY_US) - start     # the user's rows before it
        columns[name] = pa.array((total - older).astype(np.int64))
    columns[TIMESTAMP_FIELD] = _ts_array(stamp)
    return pa.table(columns)


def _popularity_table(interactions: _Coded, windows: tuple[int, ...],
                         items: np.ndarray, since: pd.Timestamp) -> pa.Table:
    """Per item, rows dated at UTC midnights D: item_popularity_<w>d = interactions on the w whole
    days before D. A row is written wherever a value changes (the day after an active day d, and
    the day its count leaves each window, d + 1 + w) plus an all-zero row per item (catalog or
    interactions) at `since`, so every example at or after `since` finds one. Rows only count days before their
    date, so an example never sees its own day: popularity as of the last midnight."""
    names = item_popularity_columns(windows)
    # item codes here: the catalog's items in its order, then those only in interactions (sorted)
    catalog = pd.Series(items).drop_duplicates().to_numpy()
    interacted = interactions.items.to_numpy(zero_copy_only=False)
    code = pd.Index(catalog).get_indexer(interacted)
    extra = np.flatnonzero(code < 0)
    code[extra] = len(catalog) + np.arange(len(extra))
    uniques = _id_array(np.concatenate([catalog, interacted[extra]]))
    # (item, day) pairs as one integer, item * span + (day - base), its order the pairs' order; span
    # leaves room for every day a row below is dated at (the last active day + 1 + the widest window)
    day = interactions.ts // _DAY_US
    base = int(day.min()) - 1 if len(day) else 0
    span = int(day.max() - base + max(windows, default=0) + 2) if len(day) else 1
    ordered = np.sort(code[interactions.item].astype(np.int64) * span + (day - base))
    first = np.flatnonzero(run_begins(ordered))
    key = ordered[first]                                        # the active (item, day) pairs
    count = np.diff(np.append(first, len(ordered)))
    a_item = key // span
    # cumulative count per item up to and including each active day
    total = np.cumsum(count)
    cum = total - (total - count)[run_start(run_begins(a_item))]

    def upto(item: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Interactions of item on days <= d (a day before the first gives 0)."""
        pos = np.searchsorted(key, item.astype(np.int64) * span + (d - base), side="right") - 1
        same = (pos >= 0) & (a_item[np.maximum(pos, 0)] == item)
        return np.where(same, cum[np.maximum(pos, 0)], 0)

    rows = sorted_unique(np.concatenate([key + 1, *(key + 1 + w for w in windows)]))
    r_item, r_day = rows // span, rows % span + base
    values = {name: upto(r_item, r_day - 1) - upto(r_item, r_day - 1 - w)
              for w, name in zip(windows, names)}
    # every item (catalog or only seen in interactions) starts at zero
    start_us = micros(pd.Series([since]))[0]
    n_all = len(uniques)
    item_col = np.concatenate([np.arange(n_all), r_item])
    out = {ITEM_KEY: uniques.take(pa.array(item_col))}
    for name in names:
        out[name] = pa.array(np.concatenate([np.zeros(n_all, np.int64), values[name]]).astype(np.int64))
    out[TIMESTAMP_FIELD] = _ts_array(np.concatenate([np.full(n_all, start_us), r_day * _DAY_US]))
    return pa.table(out)


def history_index_rows(history: pa.Table) -> pa.Table:
    """The history rows without their lists: key, time and the row's position (see definitions)."""
    return pa.table({
        USER_KEY: history.column(USER_KEY),
        HISTORY_ROW: pa.array(np.arange(history.num_rows, dtype=np.int64)),
        TIMESTAMP_FIELD: history.column(TIMESTAMP_FIELD),
    })


def seen_rows(interactions: pd.DataFrame) -> pa.Table:
    """Per user: every distinct item interacted with (newest first), dated with the "now" row."""
    return _seen_table(_coded(interactions))


def _seen_table(df: _Coded) -> pa.Table:
    # Rows are in time order per user, so keeping the last copy of a repeated item keeps its newest
    # position, and each user's last row (its latest time) is kept.
    pair = df.user.astype(np.int64) * len(df.items) + df.item
    keep = ~pd.Series(pair).duplicated(keep="last").to_numpy()
    users, items, ts = df.user[keep], df.item[keep], df.ts[keep]
    starts = np.flatnonzero(run_begins(users))
    ends = np.append(starts[1:], len(users))
    last = ts[ends - 1]
    return pa.table({
        USER_KEY: df.users.take(pa.array(users[starts])),
        SEEN_ITEMS: _plain(_windows(df.items, items, ends, starts, max(len(users), 1))),
        TIMESTAMP_FIELD: _ts_array(last + _NOW_US),
    })


def _plain(lists: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """list<dictionary<value>> as list<value>."""
    return lists.cast(pa.list_(lists.type.value_type.value_type))


def expand_lists(table: pa.Table) -> pa.Table:
    """table with its list<dictionary<value>> columns as list<value> (the history the training join
    holds keeps each item id once: at 10M string-id interactions recent_items took 1.59 GB as strings
    and 0.61 GB as codes)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_list(f.type) and pa.types.is_dictionary(f.type.value_type):
            table = table.set_column(i, f.name, _plain(table.column(i)))
    return table


@dataclass(frozen=True)
class OfflineSources:
    """What the online fill and the training join need to know about the sources just written."""

    static_at: pd.Timestamp   # the static rows' date (STATIC_LEAD before the first interaction)
    now: pd.Timestamp         # the latest "now" row's date (NOW_OFFSET after the last interaction)
    history: pa.Table         # user_history_fv's rows in file order (the join takes lists by position),
                              # its lists dictionary-coded (expand_lists)


def write_sources(features_cfg: FeaturesParams, schema: dict, users: pd.DataFrame, items: pd.DataFrame,
                  interactions: pd.DataFrame, features_dir: Path) -> OfflineSources:
    """Write the offline source of every view into features_dir (SOURCE_FILES)."""
    features_dir.mkdir(parents=True, exist_ok=True)
    static_at = interactions["timestamp"].min() - STATIC_LEAD
    windows = features_cfg.count_windows_days
    coded = _coded(interactions)
    history = _history_table(coded, features_cfg.history_length, windows)

    def write(view: str, table: pa.Table) -> None:
        pq.write_table(table, features_dir / SOURCE_FILES[view])

    write(USER_STATIC_FV, static_rows(users, USER_KEY, feature_columns(schema, "user"), static_at))
    write(ITEM_STATIC_FV, static_rows(items, ITEM_KEY, feature_columns(schema, "item"), static_at))
    write(USER_HISTORY_FV, expand_lists(history))     # plain lists only while written
    write(USER_HISTORY_INDEX_FV, history_index_rows(history))
    write(USER_SEEN_FV, _seen_table(coded))
    write(ITEM_POPULARITY_FV, _popularity_table(coded, windows, items[ITEM_KEY].to_numpy(), static_at))
    return OfflineSources(static_at, interactions["timestamp"].max() + NOW_OFFSET, history)
