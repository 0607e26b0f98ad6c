"""Positive sampling of the training stream: down-sample the positives of popular items.

word2vec's sub-sampling of frequent words (Mikolov et al. 2013; the formula of the released code):
an item whose share of all interactions is f keeps each positive with probability
min(1, sqrt(t/f) + t/f). Head items still appear often, but no longer dominate the gradient.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


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
