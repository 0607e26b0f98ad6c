"""The users whose recommendations Evidently's Diversity and Serendipity are measured on.

Both build a dense item × item cosine-distance matrix over every item in the recommendations and in
the training rows they are given (evidently/legacy/metrics/recsys/pairwise_distance.py): quadratic
in the catalog, 200k items would be 320 GB in float64. Above report.max_items_for_diversity items
they are measured on a random sample of the report's users, taken while the items of their
recommendations and training histories stay within the cap (a matrix of at most cap² floats), and
the report says so. Below the cap every user is kept and nothing changes.

Serendipity also selects each user's training rows by scanning all of them (`train_df[user_id] ==
user`, serendipity.py): users x training rows, 5,000 x 700k string comparisons at 1M interactions,
over 20 minutes on 2 loaded cores at 100k. So the sample also stops at report.max_users_pairwise
users, and only their training rows are passed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class DiversitySample:
    recs: pd.DataFrame       # the sampled users' recommendations
    train: pd.DataFrame      # their training rows (user_id, item_id)
    users: int
    items: int               # items of the distance matrix
    note: str


def _top_items(recs: pd.DataFrame, k: int) -> pd.DataFrame:
    """(user_id, item_id) of each user's top k + 1 by score: the rows Evidently keeps for the matrix."""
    rank = recs.groupby("user_id")["score"].rank(ascending=False, method="first")
    return recs.loc[rank <= k + 1, ["user_id", "item_id"]]


def diversity_sample(recs: pd.DataFrame, train: pd.DataFrame, k: int, max_items: int, max_users: int,
                     seed: int) -> DiversitySample | None:
    """None when every item of recs (top k + 1) and train fits in max_items and recs has at most
    max_users users; else at most max_users users, in a seeded random order, whose items keep the
    union within max_items (a user whose own items would overflow it is passed over)."""
    top = _top_items(recs, k)
    total = pd.concat([top["item_id"], train["item_id"]]).nunique()
    users = recs["user_id"].drop_duplicates().to_numpy()
    if total <= max_items and len(users) <= max_users:
        return None
    rng = np.random.default_rng(seed)
    history = train[train["user_id"].isin(users)]
    per_user = pd.concat([top, history]).groupby("user_id")["item_id"].unique()
    chosen: list = []
    seen: set = set()
    for user in users[rng.permutation(len(users))]:
        if len(chosen) == max_users:
            break
        mine = per_user.get(user)
        if mine is None:
            continue
        new = set(mine.tolist()) - seen
        if len(seen) + len(new) > max_items:
            continue
        seen |= new
        chosen.append(user)
    picked = recs["user_id"].isin(chosen)
    note = (f"diversity and serendipity on {len(chosen)} of {len(users)} users ({len(seen)} items): at most "
            f"report.max_users_pairwise={max_users} users and report.max_items_for_diversity={max_items} items "
            f"(of {total}; Evidently builds an items x items distance matrix and scans the training rows per user)")
    return DiversitySample(recs[picked].reset_index(drop=True),
                           history[history["user_id"].isin(chosen)].reset_index(drop=True),
                           len(chosen), len(seen), note)
