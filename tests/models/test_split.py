"""Temporal per-user split: last fraction by time, item-id tie-break, short users stay in train."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.params import SplitParams
from models.split import temporal_split

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def _rows(user, items: list, days: list) -> pd.DataFrame:
    return pd.DataFrame({"user_id": user, "item_id": items,
                         "timestamp": [T0 + pd.Timedelta(days=d) for d in days]})


def test_last_fifth_by_time_with_item_id_tie_break():
    # Ten interactions; the last three share a timestamp, so the item id decides which two are last.
    a = _rows(1, [11, 12, 13, 14, 15, 16, 17, 30, 10, 20], [1, 2, 3, 4, 5, 6, 7, 8, 8, 8])
    df = a.sample(frac=1.0, random_state=1)                  # file order is not time order
    split = temporal_split(df, SplitParams(test_fraction=0.2, min_user_interactions=5))
    assert split.index.equals(df.index)
    assert sorted(df.loc[split == "test", "item_id"]) == [20, 30]


def test_at_least_one_test_row_and_short_users_stay_in_train():
    df = pd.concat([
        _rows(1, list(range(100, 105)), [1, 2, 3, 4, 5]),    # 5 rows: 5 * 0.1 floors to 0 -> 1
        _rows(2, list(range(200, 204)), [1, 2, 3, 4]),       # 4 < min_user_interactions: all train
        _rows(3, list(range(300, 307)), [7, 6, 5, 4, 3, 2, 1]),
    ], ignore_index=True)
    split = temporal_split(df, SplitParams(test_fraction=0.1, min_user_interactions=5))
    assert df.loc[split == "test", "item_id"].tolist() == [104, 300]
    assert (split[df["user_id"] == 2] == "train").all()


@pytest.mark.parametrize("n, fraction, expected", [(10, 0.2, 2), (14, 0.2, 2), (100, 0.29, 29),
                                                   (7, 0.5, 3), (6, 0.2, 1)])
def test_test_count_is_the_floor_of_the_fraction(n, fraction, expected):
    df = _rows("u1", [f"i{k:03d}" for k in range(n)], list(range(n)))
    split = temporal_split(df, SplitParams(test_fraction=fraction, min_user_interactions=2))
    assert (split == "test").sum() == expected
    assert (split.iloc[-expected:] == "test").all()          # and they are the latest ones


def test_string_ids_duplicate_index_and_many_users():
    rng = np.random.default_rng(0)
    n = 20_000
    df = pd.DataFrame({"user_id": rng.choice([f"u{k}" for k in range(500)], n),
                       "item_id": rng.choice([f"i{k}" for k in range(900)], n),
                       "timestamp": T0 + pd.to_timedelta(rng.integers(0, 10**6, n), unit="s")})
    df.index = np.repeat(np.arange(n // 2), 2)               # a caller's index may repeat
    split = temporal_split(df, SplitParams(test_fraction=0.2, min_user_interactions=5))
    assert split.index.equals(df.index) and set(split) == {"train", "test"}
    flat = df.reset_index(drop=True).assign(split=split.to_numpy())
    for _, g in flat.groupby("user_id"):
        g = g.sort_values(["timestamp", "item_id"], kind="mergesort")
        k = max(1, int(np.floor(len(g) * 0.2 + 1e-9))) if len(g) >= 5 else 0
        assert g["split"].tolist() == ["train"] * (len(g) - k) + ["test"] * k
