"""The users whose recommendations Evidently's Diversity and Serendipity are measured on.

Both build a dense item × item cosine-distance matrix over every item in the recommendations and in
the training rows they are given (evidently/legacy/metrics/recsys/pairwise_distance.py): quadratic
in the catalog, 200k items would be 320 GB in float64. Above report.max_items_for_diversity items
they are measured on a random sample of the report's users, taken while the items of their
recommendations and training histories stay within the cap (a matrix of at most cap² floats), and
the report says so. Below the cap every user is kept and nothing changes.
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


def diversity_sample(recs: pd.DataFrame, train: pd.DataFrame, k: int, max_items: int,
                     seed: int) -> DiversitySample | None:
    """None when every item of recs (top k + 1) and train fits in max_items; else the users, in a
    seeded random order, whose items keep the union within max_items (a user whose own items would
    overflow it is passed over)."""
    top = _top_items(recs, k)
    total = pd.concat([top["item_id"], train["item_id"]]).nunique()
    if total <= max_items:
        return None
    users = recs["user_id"].drop_duplicates().to_numpy()
    rng = np.random.default_rng(seed)
    history = train[train["user_id"].isin(users)]
    per_user = pd.concat([top, history]).groupby("user_id")["item_id"].unique()
    chosen: list = []
    seen: set = set()
    for user in users[rng.permutation(len(users))]:
        mine = per_user.get(user)
        if mine is None:
            continue
        new = set(mine.tolist()) - seen
        if len(seen) + len(new) > max_items:
            continue
        seen |= new
        chosen.append(user)
    picked = recs["user_id"].isin(chosen)
    note = (f"diversity and serendipity on {len(chosen)} of {len(users)} users ({len(seen)} items): the "
            f"{total} items of all of them exceed report.max_items_for_diversity={max_items} (Evidently builds "
            "an items x items distance matrix)")
    return DiversitySample(recs[picked].reset_index(drop=True),
                           history[history["user_id"].isin(chosen)].reset_index(drop=True),
                           len(chosen), len(seen), note)
