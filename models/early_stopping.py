"""The validation split that early stopping watches, and its small full-catalog ranking eval.

Carved from the training part with the same temporal protocol as the test split
(models.split.temporal_split): each user's last `fraction` of training interactions. The task is the
test split's (models.holdout): the query is the user's first validation example, items of the user's
remaining training rows are excluded, and the validation items are the ones to find.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from models.encoding import FeatureEncoder
from models.holdout import Pairs, holdout
from models.metrics import full_catalog_metrics
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
    seen: Pairs                                   # (user row, item index) pairs excluded from ranking
    relevant: Pairs                               # (user row, item index) pairs to find
    n_items: int                                  # item-vocabulary size (index 0 = OOV is excluded)

    @property
    def n_users(self) -> int:
        return len(self.users["user"])

    @classmethod
    def build(cls, encoder: FeatureEncoder, fit_rows: pd.DataFrame, val_rows: pd.DataFrame) -> "ValidationTask | None":
        """None when no user has a validation item outside their fitting rows."""
        def column(ids: pd.Series) -> np.ndarray:     # item-vocabulary index; OOV (0) cannot be ranked
            idx = encoder.item_ids.lookup(ids)
            return np.where(idx > 0, idx, -1)

        task = holdout(fit_rows, val_rows, column)
        n_queries = len(task.queries)
        if n_queries == 0:
            return None
        users = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in encoder.encode_users(task.queries).items()}
        # the OOV column is never a recommendation: exclude it for every user
        oov_rows = np.arange(n_queries)
        return cls(users=users,
                   seen=(np.concatenate([task.seen[0], oov_rows]),
                         np.concatenate([task.seen[1], np.zeros(n_queries, np.int64)])),
                   relevant=task.relevant, n_items=encoder.item_ids.size)

    def ndcg(self, model: TwoTower, catalog: Batch, k: int = 20) -> float:
        """Mean NDCG@k over the validation users, ranking the whole item vocabulary."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device      # the training device: scored there, ranked on the CPU
        with torch.no_grad():
            item_vecs = model.encode_items({k: v.to(device) for k, v in catalog.items()}).float().cpu()   # (I, D)
            user_vecs = model.encode_users({k: v.to(device) for k, v in self.users.items()}).float().cpu()  # (U, D)
        model.train(was_training)
        metrics = full_catalog_metrics(lambda s, e: user_vecs[s:e] @ item_vecs.T, self.n_users, self.n_items,
                                       self.seen, self.relevant, [k])
        return metrics[f"ndcg@{k}"]
