"""Positive sampling of the training stream: down-sample the positives of popular items.

word2vec's sub-sampling of frequent words (Mikolov et al. 2013; the formula of the released code):
an item whose share of all interactions is f keeps each positive with probability
min(1, sqrt(t/f) + t/f). Head items still appear often, but no longer dominate the gradient.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.negatives import (HARD_NEGATIVES_COLUMN, NegativePool, NegativeSampler, draw_hard_negatives,
                              factorize_parts, prepare_negatives)
from models.params import SampleParams
from models.parquet_stream import open_stream


def keep_probability(item_ids: pd.Series, threshold: float) -> np.ndarray:
    """Per-row keep probability (float64, len(item_ids)) from each item's frequency share."""
    if threshold <= 0:
        raise ValueError(f"sample.popular_threshold must be > 0 (got {threshold})")
    share = item_ids.map(item_ids.value_counts(normalize=True)).to_numpy(dtype=np.float64)
    ratio = threshold / share
    return np.minimum(1.0, np.sqrt(ratio) + ratio)


def downsample_mask(item_ids: pd.Series, threshold: float, uniforms: np.ndarray) -> np.ndarray:
    """Boolean mask of rows kept. `uniforms` (one U[0,1) draw per row) makes it deterministic by seed."""
    if len(uniforms) != len(item_ids):
        raise ValueError(f"need one uniform draw per row (got {len(uniforms)} for {len(item_ids)} rows)")
    return uniforms < keep_probability(item_ids, threshold)


STREAMS = {"train": "train.parquet", "full": "full.parquet"}   # stream -> file in the samples folder
KEY_COLUMNS = ["user_id", "item_id", "split", "timestamp"]   # all that sampling decides on
DRAW_ROWS = 1_000_000     # kept rows per hard-negative draw: bounds its (rows, k) arrays


class _Lists:
    """Hard-negative lists handed out in stream order from chunks drawn as they are needed."""

    def __init__(self, chunks: Iterator[pa.Array], item_type: pa.DataType) -> None:
        self._chunks, self._held, self._type = chunks, [], item_type

    def take(self, n: int) -> pa.Array:
        if n == 0:          # a batch without rows of this stream (e.g. only test rows)
            return pa.array([], type=pa.list_(self._type))
        while sum(len(c) for c in self._held) < n:
            self._held.append(next(self._chunks))
        whole = pa.concat_arrays(self._held) if len(self._held) > 1 else self._held[0]
        rest = whole.slice(n)
        self._held = [rest] if len(rest) else []
        return whole.slice(0, n)


def _coded(keys: pd.DataFrame, pool: NegativePool,
           item_type: pa.DataType) -> tuple[pd.DataFrame, NegativePool, pa.Array]:
    """The keys and the pool with their user and item ids as integer codes shared by both (a null id:
    a null code), and the item id of each item code. Each id column is hashed once here: hashed again
    wherever it was used (each stream's pool filter, every draw chunk's request lookup, the popularity
    counts), string ids were a fifth of the 10M sample stage and grew faster than the rows."""
    (key_user, pool_user, request_user), _ = factorize_parts([keys["user_id"], pool.user, pool.request_user])
    (key_item, pool_item), item_ids = factorize_parts([keys["item_id"], pool.item])

    def codes(values: np.ndarray) -> pd.Series:
        return pd.Series(pd.arrays.IntegerArray(values.astype(np.int64), values < 0))

    coded = keys.assign(user_id=codes(key_user), item_id=codes(key_item))
    coded_pool = replace(pool, user=codes(pool_user), item=codes(pool_item), request_user=codes(request_user))
    return coded, coded_pool, pa.array(np.asarray(item_ids), type=item_type)


def _with_ids(sampler: NegativeSampler, item_ids: pa.Array) -> NegativeSampler:
    """A sampler prepared on item codes, drawing item ids."""
    return replace(sampler, items=item_ids.take(sampler.items), item_type=item_ids.type)


def _draws(sampler: NegativeSampler, keys: pd.DataFrame, rows: np.ndarray, k: int,
           rng: np.random.Generator) -> Iterator[pa.Array]:
    for at in range(0, len(rows), DRAW_ROWS):
        yield draw_hard_negatives(sampler, keys.iloc[rows[at:at + DRAW_ROWS]], k, rng)


def write_sampled_streams(sample_cfg: SampleParams, seed: int, examples_path: Path, pool: NegativePool,
                          out_dir: Path, read_rows: int = 200_000) -> dict:
    """Down-sample popular items' positives of examples_path (user_id, item_id, split, timestamp[,
    weight], any feature columns) and write each stream of STREAMS to out_dir with a `hard_negatives`
    list column of up to sample_cfg.hard_negatives items per row from `pool`; returns the summary.

    Streamed: the decisions read the key columns only, the hard negatives are drawn DRAW_ROWS kept
    rows at a time, and the rows (with their feature lists) are copied read_rows at a time, so memory
    does not grow with the examples' width (10M examples with 16 negatives each as Python lists took
    13.2 GB). The train stream is split == 'train' (the evaluation model), full is every row (the refit
    model). Each file is written beside its place and moved there when complete."""
    source = open_stream(examples_path)
    item_type = source.schema_arrow.field("item_id").type
    keys, pool, item_ids = _coded(source.read(columns=KEY_COLUMNS).to_pandas(), pool, item_type)
    # one draw per example row, shared by both streams: a train row kept for the evaluation model
    # is decided by the same coin as in the refit stream (only the frequencies differ)
    uniforms = np.random.default_rng(seed).random(len(keys))
    is_train = (keys["split"] == "train").to_numpy()
    keep_train = downsample_mask(keys["item_id"][is_train].reset_index(drop=True), sample_cfg.popular_threshold,
                                 uniforms[is_train])
    keep = {"train": np.zeros(len(keys), bool), "full": downsample_mask(keys["item_id"], sample_cfg.popular_threshold,
                                                                        uniforms)}
    keep["train"][np.flatnonzero(is_train)[keep_train]] = True
    # positives whose items are never a user's negatives: the train rows for the evaluation model
    # (test rows stay unseen), every row for the refit model
    samplers = {"train": _with_ids(prepare_negatives(pool, keys[is_train], pa.int64()), item_ids),
                "full": _with_ids(prepare_negatives(pool, keys, pa.int64()), item_ids)}
    # a separate stream from the positive coins, so turning negatives on keeps the same positives; the
    # full stream's draws follow the train stream's in it (k doubles per kept row, one 64-bit step each)
    k = sample_cfg.hard_negatives
    kept = {name: np.flatnonzero(mask) for name, mask in keep.items()}
    drawn = int(len(kept["train"]) * k) if not pool.empty else 0
    rngs = {"train": np.random.default_rng([seed, 1]),
            "full": np.random.Generator(np.random.PCG64([seed, 1]).advance(drawn))}
    lists = {name: _Lists(_draws(samplers[name], keys, kept[name], k, rngs[name]), item_type) for name in STREAMS}

    schema = source.schema_arrow.remove_metadata()
    add_weight = "weight" not in schema.names
    if add_weight:
        schema = schema.append(pa.field("weight", pa.float64()))
    schema = schema.append(pa.field(HARD_NEGATIVES_COLUMN, pa.list_(item_type)))
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = {name: out_dir / f".{file}.partial" for name, file in STREAMS.items()}
    stats = {name: {"with": 0, "total": 0} for name in STREAMS}
    writers = {name: pq.ParquetWriter(partial[name], schema) for name in STREAMS}
    try:
        offset = 0
        for batch in source.iter_batches(batch_size=read_rows):
            for name, writer in writers.items():
                rows = batch.filter(pa.array(keep[name][offset:offset + batch.num_rows]))
                negatives = lists[name].take(rows.num_rows)
                lengths = pc.list_value_length(negatives)
                stats[name]["with"] += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
                stats[name]["total"] += int(pc.sum(lengths).as_py() or 0)
                columns = [*rows.columns, *([pa.array(np.ones(rows.num_rows))] if add_weight else []), negatives]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
            offset += batch.num_rows
    except BaseException:
        for name, writer in writers.items():
            writer.close()
            partial[name].unlink(missing_ok=True)
        raise
    for writer in writers.values():
        writer.close()
    for name, file in STREAMS.items():
        os.replace(partial[name], out_dir / file)

    def counts(name: str, rows: int) -> dict:
        n = len(kept[name])
        return {"rows": rows, "kept": n, "dropped": rows - n,
                "examples_with_hard_negatives": stats[name]["with"],
                "mean_hard_negatives": round(stats[name]["total"] / n, 3) if n else 0.0}

    return {
        "popular_threshold": sample_cfg.popular_threshold,
        "train": counts("train", int(is_train.sum())),
        "full": counts("full", len(is_train)),
        "hard_negatives": {
            "per_example": k, "shown_unclicked": sample_cfg.shown_unclicked_negatives,
            "log_rows": pool.log_rows, "pool_rows": int(len(pool.request)),
            "requests": int(len(pool.request_user)),
            "note": None if not pool.empty else "no hard negatives: ranking logs absent, empty, or "
                                                "sample.hard_negatives is 0",
        },
    }
