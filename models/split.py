"""Temporal per-user train/test split.

Each user's last `test_fraction` of interactions (by timestamp, ties broken by item id) is the test
part, at least one row; users with fewer than `min_user_interactions` stay entirely in train, since a
one- or two-item history says little about ranking quality. Vectorized: one sort and a cumcount.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from models.params import SplitParams


def temporal_split(interactions: pd.DataFrame, split_cfg: SplitParams) -> pd.Series:
    """'train' / 'test' for each row of interactions (same index)."""
    # Positional index, so a caller's duplicate or non-range index cannot misalign the labels.
    order = interactions[["user_id", "timestamp", "item_id"]].reset_index(drop=True).sort_values(
        ["user_id", "timestamp", "item_id"], kind="mergesort")
    by_user = order.groupby("user_id", sort=False)
    position = by_user.cumcount().to_numpy()                 # 0-based rank by time within user
    n = by_user["user_id"].transform("size").to_numpy()
    # The epsilon keeps 0.29 * 100 from flooring to 28.
    n_test = np.maximum(1, np.floor(n * split_cfg.test_fraction + 1e-9)).astype(np.int64)
    is_test = (n >= split_cfg.min_user_interactions) & (position >= n - n_test)
    labels = np.empty(len(order), dtype=object)
    labels[order.index.to_numpy()] = np.where(is_test, "test", "train")
    return pd.Series(labels, index=interactions.index, name="split")
