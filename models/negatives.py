"""Negatives for the retrieval loss: easy ones from the catalog, hard ones mined from ranking logs.

Easy negatives are drawn from the whole catalog with probability ∝ popularity^0.75 (word2vec's
unigram^3/4 noise distribution, Mikolov et al. 2013): between uniform (mostly irrelevant tail items)
and the positive stream itself (which in-batch negatives already cover).

Hard negatives are what the production funnel itself rejected: items that retrieval returned for a
request but the ranker eliminated (log stage 'retrieved' or 'ranked', never shown). They look
relevant to retrieval yet lost to better items, so they teach what the in-batch negatives cannot.
Shown-but-not-clicked items are left out by default: a skipped item may simply not have been
examined (position bias), so it is weak evidence of irrelevance; `include_shown_unclicked` turns them
on for the ablation. A training example only takes negatives from its user's latest request at or
before its own timestamp, so no future information leaks in, and an item that is a positive of that
user in the stream's source rows is never a negative.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.arrays import isin_sorted, micros, search_sorted, sorted_unique
from models.errors import ModelInputError
from models.parquet_stream import open_stream

HARD_NEGATIVES_COLUMN = "hard_negatives"   # list column of the sampled streams: item ids per example
LOG_COLUMNS = ["request_id", "user_id", "item_id", "timestamp", "stage", "clicked"]
READ_BATCH_ROWS = 1 << 20   # rows per parquet batch: bounds the transient memory of reading the logs


def popularity_distribution(counts: np.ndarray, power: float) -> np.ndarray:
    """Sampling probabilities over item-vocabulary indices: ∝ (count + 1)^power, index 0 (OOV) never.

    The add-one keeps catalog items without interactions in the sample (cold items still need to be
    pushed away from users); power 0 is uniform over the catalog."""
    if len(counts) < 2:
        raise ValueError(f"need at least one item besides OOV (got {len(counts)} vocabulary entries)")
    weights = np.power(np.asarray(counts, dtype=np.float64) + 1.0, power)
    weights[0] = 0.0
    return weights / weights.sum()


@dataclass
class NegativePool:
    """Log rows that may serve as hard negatives, compact: one row per (request, item)."""

    request: np.ndarray          # (P,) int64 request code, rows sorted by it
    user: pd.Series              # (P,) user id of the request (categorical, as read from a log)
    item: pd.Series              # (P,) item id (categorical, as read from a log)
    request_user: pd.Series      # (R,) user id of each request code (categorical, as read from a log)
    request_time: pd.Series      # (R,) request timestamp (its earliest row)
    log_rows: int                # rows in the log file

    @property
    def empty(self) -> bool:
        return len(self.request) == 0

    @classmethod
    def none(cls) -> "NegativePool":
        """No log rows: every example gets an empty list of hard negatives."""
        empty = pd.Series([], dtype=object)
        return cls(request=np.zeros(0, np.int64), user=empty, item=empty, request_user=empty,
                   request_time=empty, log_rows=0)


def load_negative_pool(logs_path: Path, include_shown_unclicked: bool = False) -> NegativePool:
    """Read the negative-stage rows of ranking_logs.parquet batch by batch (the file can be large).

    Their ids become categoricals: a code per row and each distinct id once, never a Python object
    per row (models/sampling.py codes them through their categories). String columns are read as
    the file's own dictionaries: on the 700k bench's log (14.0M rows, 11.2M kept, string ids) reading
    and coding took 1.6 s against 5.4 s as strings, and the pool with its coding 12 -> 4.6 s."""
    if not logs_path.exists():
        raise ModelInputError(f"{logs_path}: not found")
    names = pq.read_schema(logs_path)
    missing = [c for c in LOG_COLUMNS if c not in names.names]
    if missing:
        raise ModelInputError(f"{logs_path}: required columns {missing} are missing")
    strings = [c for c in ("request_id", "user_id", "item_id", "stage")
               if pa.types.is_string(names.field(c).type) or pa.types.is_large_string(names.field(c).type)]
    file = open_stream(logs_path, read_dictionary=strings)
    kept = ["request_id", "user_id", "item_id", "timestamp"]
    parts = []
    for batch in file.iter_batches(batch_size=READ_BATCH_ROWS, columns=LOG_COLUMNS):
        stage = batch.column("stage")      # is_in, not equal: the column may be a dictionary
        keep = pc.is_in(stage, value_set=pa.array(["retrieved", "ranked"]))
        if include_shown_unclicked:
            shown_skip = pc.and_(pc.is_in(stage, value_set=pa.array(["shown"])),
                                 pc.invert(pc.fill_null(batch.column("clicked"), False)))
            keep = pc.or_(keep, shown_skip)
        parts.append(batch.filter(pc.fill_null(keep, False)).select(kept))
    table = pa.Table.from_batches(parts, schema=pa.schema([file.schema_arrow.field(c) for c in kept]))
    codes = _first_use_codes(table.column("request_id"))
    order = np.argsort(codes, kind="stable")
    frame = pd.DataFrame({"user_id": _categorical(table.column("user_id"), order),
                          "item_id": _categorical(table.column("item_id"), order),
                          "timestamp": table.column("timestamp").take(pa.array(order)).to_pandas()})
    codes = codes[order]
    per_request = frame.groupby(codes, sort=True).agg(user_id=("user_id", "first"), timestamp=("timestamp", "min"))
    return NegativePool(request=codes, user=frame["user_id"], item=frame["item_id"],
                        request_user=per_request["user_id"].reset_index(drop=True),
                        request_time=per_request["timestamp"].reset_index(drop=True),
                        log_rows=file.metadata.num_rows)


def _dictionary_codes(ids: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(an int64 code per row into the distinct ids, -1 for null; the distinct ids), from the file's
    dictionaries when the column was read as them (their order is the writer's), else arrow's
    dictionary_encode (the order the rows first use them)."""
    if pa.types.is_dictionary(ids.type):
        ids = ids.unify_dictionaries()
        dictionary = ids.chunk(0).dictionary if ids.num_chunks else pa.array([], type=ids.type.value_type)
        indices = pa.chunked_array([c.indices for c in ids.chunks], type=ids.type.index_type).combine_chunks()
    else:
        encoded = pc.dictionary_encode(ids.combine_chunks())
        dictionary, indices = encoded.dictionary, encoded.indices
    return pc.fill_null(indices, -1).to_numpy().astype(np.int64), dictionary


def _first_use_codes(ids: pa.ChunkedArray) -> np.ndarray:
    """An int64 code per row (-1 for null) numbered in the order the rows first use the ids, as
    dictionary_encode of plain values numbers them, however the column was read: the request codes,
    whose order decides the pool's row order and so every draw."""
    codes, dictionary = _dictionary_codes(ids)
    first = pd.unique(codes[codes >= 0])
    rank = np.full(len(dictionary) + 1, -1, dtype=np.int64)      # the last: a null row's
    rank[first] = np.arange(len(first))
    return rank[codes]


def _categorical(ids: pa.ChunkedArray, order: np.ndarray) -> pd.Categorical:
    """The ids at rows `order` as a pandas Categorical (categories: the distinct ids, in any order:
    factorize_parts numbers them by first use; null: code -1)."""
    codes, dictionary = _dictionary_codes(ids)
    return pd.Categorical.from_codes(codes[order], categories=pd.Index(dictionary.to_pandas()))


def factorize_parts(parts: list[pd.Series]) -> tuple[list[np.ndarray], np.ndarray]:
    """pd.factorize of the parts concatenated, split back per part: the same codes and uniques. A
    categorical part is hashed through its categories in the order its rows first use them (what the
    factorize of its rows finds first), not row by row; its null rows get -1 as factorize gives."""
    hashed: list[pd.Series] = []
    used: list[np.ndarray | None] = []
    for part in parts:
        if isinstance(part.dtype, pd.CategoricalDtype):
            rows = part.cat.codes.to_numpy()
            first = pd.unique(rows[rows >= 0])                         # categories by first use
            hashed.append(pd.Series(part.cat.categories.take(first)))
            used.append(first)
        else:
            hashed.append(part)
            used.append(None)
    # empty parts left out: they add no value, and pandas' concat would let them decide the dtype
    codes, uniques = pd.factorize(pd.concat([h for h in hashed if len(h)] or hashed[:1], ignore_index=True))
    out, at = [], 0
    for part, h, first in zip(parts, hashed, used):
        own = codes[at:at + len(h)]
        at += len(h)
        if first is None:
            out.append(own)
            continue
        lookup = np.full(len(part.cat.categories) + 1, -1, dtype=own.dtype)   # the last: a null row's
        lookup[first] = own
        out.append(lookup[part.cat.codes.to_numpy()])
    return out, uniques


def latest_request(examples: pd.DataFrame, pool: NegativePool) -> np.ndarray:
    """(N,) code of each example's user's latest request at or before the example's timestamp; -1: none.

    Binary searches on one integer key, (user, rank of the time among the request times), in place of
    a merge_asof by user: the requests are few (one per logged impression list), so the ranks are
    cheap, and the examples are searched without being sorted by time or grouped by user."""
    n = len(examples)
    if pool.empty or n == 0:
        return np.full(n, -1, np.int64)
    # one hashing pass codes both sides' users alike; a request by a user with no example never matches
    (ex_user, req_user), _ = factorize_parts([examples["user_id"], pool.request_user])
    ex_user, req_user = ex_user.astype(np.int64), req_user.astype(np.int64)
    ex_t, req_t = micros(examples["timestamp"]), micros(pool.request_time)
    times = sorted_unique(req_t)
    span = np.int64(len(times) + 1)
    # rank of t = how many distinct request times are <= t (integers: <= t is < t + 1)
    req_key = req_user * span + search_sorted(times, req_t + 1)
    order = np.lexsort((np.arange(len(req_key)), req_key))      # ties: the last request code wins
    keys = req_key[order]
    ex_key = ex_user * span + search_sorted(times, ex_t + 1)
    # the last request key <= the example's: that user's latest request at or before its time
    at = search_sorted(keys, ex_key + 1) - 1
    found = (at >= 0) & (ex_user >= 0)
    at = np.maximum(at, 0)
    found &= keys[at] // span == ex_user
    return np.where(found, order[at], -1).astype(np.int64)


@dataclass(frozen=True)
class NegativeSampler:
    """The pool prepared against one stream's positives: its usable rows (no (user, item) pair that is
    a positive), grouped by request, as codes into `items`."""

    pool: NegativePool
    items: pa.Array              # item ids of the positives and the pool (as the stream types them)
    item_code: np.ndarray        # (U,) usable pool rows' item codes, by request
    start: np.ndarray            # (R,) first usable row of each request
    count: np.ndarray            # (R,) usable rows of each request
    item_type: pa.DataType       # the stream's item id type (int64 or string): the list column's


def prepare_negatives(pool: NegativePool, positives: pd.DataFrame, item_type: pa.DataType) -> NegativeSampler:
    """Remove from `pool` every (user, item) pair of `positives` (user_id, item_id): the stream's source
    rows, whose items must never be negatives of their user."""
    if pool.empty:
        return NegativeSampler(pool, pa.array([], type=item_type), np.zeros(0, np.int64), np.zeros(0, np.int64),
                               np.zeros(0, np.int64), item_type)
    # One hashing pass per id column codes the positives and the pool alike (10M positives + 9.2M
    # pool rows: unique then get_indexer hashed each id twice, 42 s of the 10M sample stage).
    (pos_user, pool_user), _ = factorize_parts([positives["user_id"], pool.user])
    (pos_item, pool_item), item_ids = factorize_parts([positives["item_id"], pool.item])
    # a null id (code -1) makes no pool pair match
    pos_pair = pos_user.astype(np.int64) * len(item_ids) + pos_item
    pool_pair = pool_user.astype(np.int64) * len(item_ids) + pool_item
    usable = (pool_item >= 0) & ~isin_sorted(pool_pair, sorted_unique(pos_pair))
    request = pool.request[usable]
    count = np.bincount(request, minlength=len(pool.request_user))
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return NegativeSampler(pool, pa.array(np.asarray(item_ids), type=item_type), pool_item[usable], start,
                           count, item_type)


def draw_hard_negatives(sampler: NegativeSampler, examples: pd.DataFrame, k: int,
                        rng: np.random.Generator) -> pa.Array:
    """A list of up to k distinct item ids per row of `examples` (user_id, timestamp), aligned with it.

    Drawn with replacement from the usable pool of the example's latest request at or before its
    timestamp; duplicates are then dropped, so a small pool gives fewer than k. Vectorized: one (N, k)
    draw, so consecutive calls on consecutive rows draw what one call on all of them would."""
    n = len(examples)
    if k == 0 or sampler.pool.empty or n == 0:
        return pa.array([[]] * n, type=pa.list_(sampler.item_type))
    item_code, count, start = sampler.item_code, sampler.count, sampler.start
    req = latest_request(examples, sampler.pool)                          # (N,)
    has = req >= 0
    size = np.where(has, count[np.maximum(req, 0)], 0)                    # (N,)
    draw = np.floor(rng.random((n, k)) * size[:, None]).astype(np.int64)  # (N, k)
    picked = np.where(size[:, None] > 0, item_code[np.minimum(start[np.maximum(req, 0)][:, None] + draw,
                                                              max(len(item_code) - 1, 0))], -1)
    picked = np.sort(picked, axis=1)
    dup = np.zeros_like(picked, dtype=bool)
    dup[:, 1:] = picked[:, 1:] == picked[:, :-1]
    picked[dup] = -1
    valid = picked >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
    values = sampler.items.take(pa.array(picked[valid]))      # arrow's take: no id objects per row
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def item_id_type(examples: pd.DataFrame) -> pa.DataType:
    """The arrow type of a frame's item_id (int64 or string): the hard-negative lists use it."""
    return pa.array(examples["item_id"].iloc[:1]).type if len(examples) else pa.int64()


def attach_hard_negatives(examples: pd.DataFrame, pool: NegativePool, positives: pd.DataFrame, k: int,
                          rng: np.random.Generator) -> pa.Array:
    """A list of up to k distinct item ids per example (a pyarrow list array aligned with `examples`),
    from `pool` less every (user, item) pair in `positives` (see draw_hard_negatives)."""
    item_type = item_id_type(examples)
    if k == 0 or pool.empty or len(examples) == 0:
        return pa.array([[]] * len(examples), type=pa.list_(item_type))
    return draw_hard_negatives(prepare_negatives(pool, positives, item_type), examples, k, rng)

