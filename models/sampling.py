"""Positive sampling of the training stream: down-sample the positives of popular items.

word2vec's sub-sampling of frequent words (Mikolov et al. 2013; the formula of the released code):
an item whose share of all interactions is f keeps each positive with probability
min(1, sqrt(t/f) + t/f). Head items still appear often, but no longer dominate the gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.negatives import NegativePool, with_hard_negatives
from models.params import SampleParams


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


@dataclass
class SampledStreams:
    """The positive streams of the two models, each row with its hard negatives, and their counts."""

    train: pd.DataFrame        # from split == 'train': trains the evaluation model
    full: pd.DataFrame         # from all rows: trains the refit model
    summary: dict              # rows kept / dropped per stream, hard-negative counts


def sample_streams(sample_cfg: SampleParams, seed: int, examples: pd.DataFrame,
                   pool: NegativePool) -> SampledStreams:
    """Down-sample popular items' positives of `examples` (user_id, item_id, split, timestamp[, weight])
    and attach up to sample_cfg.hard_negatives items per row from `pool`."""
    if "weight" not in examples.columns:
        examples = examples.assign(weight=1.0)
    # one draw per example row, shared by both streams: a train row kept for the evaluation model
    # is decided by the same coin as in the refit stream (only the frequencies differ)
    uniforms = np.random.default_rng(seed).random(len(examples))
    is_train = (examples["split"] == "train").to_numpy()
    train_part = examples[is_train].reset_index(drop=True)
    keep_train = downsample_mask(train_part["item_id"], sample_cfg.popular_threshold, uniforms[is_train])
    keep_full = downsample_mask(examples["item_id"], sample_cfg.popular_threshold, uniforms)
    # a separate stream from the positive coins, so turning negatives on keeps the same positives
    rng = np.random.default_rng([seed, 1])
    k = sample_cfg.hard_negatives
    train_rows, train_stats = with_hard_negatives(train_part[keep_train].reset_index(drop=True), train_part,
                                                  pool, k, rng)
    full_rows, full_stats = with_hard_negatives(examples[keep_full].reset_index(drop=True), examples, pool, k, rng)
    summary = {
        "popular_threshold": sample_cfg.popular_threshold,
        "train": {"rows": int(len(train_part)), "kept": int(keep_train.sum()),
                  "dropped": int((~keep_train).sum()), **train_stats},
        "full": {"rows": int(len(examples)), "kept": int(keep_full.sum()), "dropped": int((~keep_full).sum()),
                 **full_stats},
        "hard_negatives": {
            "per_example": k, "shown_unclicked": sample_cfg.shown_unclicked_negatives,
            "log_rows": pool.log_rows, "pool_rows": int(len(pool.request)),
            "requests": int(len(pool.request_user)),
            "note": None if not pool.empty else "no hard negatives: ranking logs absent, empty, or "
                                                "sample.hard_negatives is 0",
        },
    }
    return SampledStreams(train=train_rows, full=full_rows, summary=summary)
