"""Ingested tables for the materialize and features tests (contract tables as ingest writes them,
plus the cases the point-in-time join must survive) and brute-force expectations to check against."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from datagen import make_contract_dataset

HISTORY = 3


def contract_schema(string_ids: bool) -> dict:
    dtype = "string" if string_ids else "int64"
    return {"user_id_dtype": dtype, "item_id_dtype": dtype,
            "user_features": {"categorical": ["age_bucket", "gender", "occupation"],
                              "numeric": ["age"], "multi": []},
            "item_features": {"categorical": ["title"], "numeric": ["year"], "multi": ["genres"]},
            "has_rating": True, "ranking_logs": "none", "source": "tests"}


def ingested_tables(root: Path, string_ids: bool) -> Path:
    """Contract tables as ingest writes them, plus the cases the join must survive."""
    ing = make_contract_dataset(root / "ingested", n_users=25, n_items=40, per_user=(4, 14),
                                seed=3, string_ids=string_ids)
    users = pd.read_parquet(ing / "users.parquet")
    users["age"] = np.arange(len(users), dtype="int64") + 18
    lonely = "u9999" if string_ids else 9999          # a user with no interactions at all
    users = pd.concat([users, users.iloc[[0]].assign(user_id=lonely)], ignore_index=True)
    users.to_parquet(ing / "users.parquet", index=False)

    inter = pd.read_parquet(ing / "interactions.parquet")
    inter["weight"] = 1.0
    # Same user, same timestamp, different items (feast#6787 would collapse these): give each of
    # the first three users' 2nd-4th interactions the time of the 2nd.
    for u in users["user_id"].iloc[:3]:
        idx = inter.index[inter["user_id"] == u][1:4]
        inter.loc[idx, "timestamp"] = inter.loc[idx[0], "timestamp"]
    inter = inter.sample(frac=1.0, random_state=0).reset_index(drop=True)   # file order != time order
    inter.to_parquet(ing / "interactions.parquet", index=False)
    (ing / "schema.json").write_text(json.dumps(contract_schema(string_ids)))
    return ing


def expected_recent(inter: pd.DataFrame, user, at: pd.Timestamp, n: int) -> list:
    """Brute force: the user's items strictly before `at`, newest first (ties: larger item first)."""
    before = inter[(inter["user_id"] == user) & (inter["timestamp"] < at)]
    return before.sort_values(["timestamp", "item_id"], ascending=False)["item_id"].tolist()[:n]


def expected_count(inter: pd.DataFrame, user, at: pd.Timestamp, days: int | None) -> int:
    """Brute force: the user's interactions in [at - days, at) (all before `at` when days is None)."""
    mine = inter[(inter["user_id"] == user) & (inter["timestamp"] < at)]
    if days is not None:
        mine = mine[mine["timestamp"] >= at - pd.Timedelta(days=days)]
    return len(mine)
