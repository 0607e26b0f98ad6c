"""The validation split that early stopping watches, and its small full-catalog ranking eval.

Carved from the training part with the same temporal protocol as the test split
(models.split.temporal_split): each user's last `fraction` of training interactions. The query is the
user's first validation example (its features and recent_items, all history before it), items of the
user's remaining training rows are excluded, and the validation items are the ones to find.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from models.encoding import FeatureEncoder
from models.params import SplitParams
from models.split import temporal_split
from models.towers import Batch, TwoTower

KEY_COLUMNS = ["user_id", "item_id", "timestamp"]


def carve(train_part: pd.DataFrame, fraction: float) -> pd.Series:
    """Bool per row of train_part: True for the validation rows."""
    labels = temporal_split(train_part, SplitParams(test_fraction=fraction))
    return labels == "test"


def outside(rows: pd.DataFrame, held_out: pd.DataFrame) -> np.ndarray:
    """Bool per row of `rows`: its (user, item, timestamp) is not among the held-out rows' keys."""
    keys = held_out[KEY_COLUMNS].drop_duplicates()
    merged = rows[KEY_COLUMNS].reset_index(drop=True).merge(keys, how="left", on=KEY_COLUMNS, indicator=True)
    return (merged["_merge"] == "left_only").to_numpy()


@dataclass
class ValidationTask:
    users: Batch                                  # (U, ...) encoded query rows
    seen: tuple[np.ndarray, np.ndarray]           # (user row, item index) pairs excluded from ranking
    relevant: tuple[np.ndarray, np.ndarray]       # (user row, item index) pairs to find
    n_items: int                                  # item-vocabulary size (index 0 = OOV is excluded)

    @property
    def n_users(self) -> int:
        return len(self.users["user"])

    @classmethod
    def build(cls, encoder: FeatureEncoder, fit_rows: pd.DataFrame, val_rows: pd.DataFrame) -> "ValidationTask | None":
        """None when no user has a validation item outside their fitting rows."""
        n_items = encoder.item_ids.size
        seen = pd.DataFrame({"user_id": fit_rows["user_id"].to_numpy(), "col": encoder.item_ids.lookup(fit_rows["item_id"])})
        target = pd.DataFrame({"user_id": val_rows["user_id"].to_numpy(), "col": encoder.item_ids.lookup(val_rows["item_id"])})
        seen, target = seen[seen["col"] > 0].drop_duplicates(), target[target["col"] > 0].drop_duplicates()
        target = target.merge(seen, how="left", indicator=True).query("_merge == 'left_only'").drop(columns="_merge")
        queries = val_rows.sort_values("timestamp", kind="stable").drop_duplicates("user_id", keep="first")
        queries = queries[queries["user_id"].isin(target["user_id"])].reset_index(drop=True)
        if len(queries) == 0:
            return None
        row = pd.Index(queries["user_id"])
        seen = seen[seen["user_id"].isin(row)]
        users = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in encoder.encode_users(queries).items()}
        # the OOV column is never a recommendation: exclude it for every user
        oov_rows = np.arange(len(queries))
        return cls(users=users,
                   seen=(np.concatenate([row.get_indexer(seen["user_id"]), oov_rows]),
                         np.concatenate([seen["col"].to_numpy(), np.zeros(len(queries), np.int64)])),
                   relevant=(row.get_indexer(target["user_id"]), target["col"].to_numpy()),
                   n_items=n_items)

    def ndcg(self, model: TwoTower, catalog: Batch, k: int = 20) -> float:
        """Mean NDCG@k over the validation users, ranking the whole item vocabulary."""
        from models.metrics import full_catalog_metrics

        was_training = model.training
        model.eval()
        with torch.no_grad():
            item_vecs = model.encode_items(catalog)                               # (I, D)
            user_vecs = model.encode_users(self.users)                            # (U, D)
        model.train(was_training)
        metrics = full_catalog_metrics(lambda s, e: user_vecs[s:e] @ item_vecs.T, self.n_users, self.n_items,
                                       self.seen, self.relevant, [k])
        return metrics[f"ndcg@{k}"]
