"""The held-out ranking task, one protocol for the test split (evaluate stage) and the validation split
(early stopping, EASE's λ scan).

Given the rows a model may learn from and the held-out rows after them: the query of a user is their
first held-out row (its features and recent_items, all history before it); the items of the user's
fitting rows are excluded from the ranking, so they cannot be targets either; the user's other
held-out items are the ones to find. Users with nothing left to find are not queried.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from models.encoding import Vocab
from models.metrics import tail_items

Pairs = tuple[np.ndarray, np.ndarray]      # (query row, item column) per pair


@dataclass
class Holdout:
    queries: pd.DataFrame           # one held-out row per queried user (row i = query i)
    seen: Pairs                     # pairs excluded from each query's ranking
    relevant: Pairs                 # pairs to find
    fitted: pd.DataFrame            # (user_id, col) of every user's fitting rows, distinct, in row order


def holdout(fit_rows: pd.DataFrame, held_rows: pd.DataFrame,
            column: Callable[[pd.Series], np.ndarray]) -> Holdout:
    """The task from fit_rows and held_rows (user_id, item_id[, timestamp]); column(item ids) gives
    each item's column in the ranking, -1 for items that cannot be ranked (not in the catalog)."""
    seen = pd.DataFrame({"user_id": fit_rows["user_id"].to_numpy(), "col": column(fit_rows["item_id"])})
    target = pd.DataFrame({"user_id": held_rows["user_id"].to_numpy(), "col": column(held_rows["item_id"])})
    seen = seen[seen["col"] >= 0].drop_duplicates()
    # an item the user already had is excluded from the ranking, so it cannot be a target
    target = target[target["col"] >= 0].drop_duplicates()
    target = target.merge(seen, how="left", indicator=True).query("_merge == 'left_only'").drop(columns="_merge")
    order = held_rows.sort_values("timestamp", kind="stable") if "timestamp" in held_rows.columns else held_rows
    queries = order.drop_duplicates("user_id", keep="first")
    queries = queries[queries["user_id"].isin(target["user_id"])].reset_index(drop=True)
    row = pd.Index(queries["user_id"])
    query_seen = seen[seen["user_id"].isin(row)]
    return Holdout(queries=queries,
                   seen=(row.get_indexer(query_seen["user_id"]), query_seen["col"].to_numpy()),
                   relevant=(row.get_indexer(target["user_id"]), target["col"].to_numpy()),
                   fitted=seen)


@dataclass
class CatalogTask:
    """The held-out task over the item catalog (column j = catalog item j), for models and baselines
    fitted on the training part."""

    catalog: pd.DataFrame           # distinct items, in file order
    queries: pd.DataFrame
    seen: Pairs
    relevant: Pairs
    train_cols: np.ndarray          # catalog column of every training row (-1: not in the catalog)
    train_pairs: Pairs              # (user code, column) of every user's training items

    @property
    def n_users(self) -> int:
        return len(self.queries)

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    def tail(self, tail_share: float) -> np.ndarray:
        """(n_items,) bool: the less popular tail_share of the catalog by training interactions."""
        cols = self.train_cols
        return tail_items(cols[cols >= 0], self.n_items, head_share=1.0 - tail_share)

    def cold(self) -> np.ndarray:
        """(n_items,) bool: the catalog items no training row holds (a model places them from their
        features alone, if at all)."""
        return np.bincount(self.train_cols[self.train_cols >= 0], minlength=self.n_items) == 0

    def item_groups(self, tail_share: float) -> dict[str, np.ndarray]:
        """The item groups whose recall is figured apart (metrics.full_catalog_metrics groups)."""
        return {"tail": self.tail(tail_share), "cold": self.cold()}

    def cold_held_out(self) -> int:
        """Held-out (user, item) pairs whose item no training row holds."""
        return int(self.cold()[self.relevant[1]].sum())


def catalog_task(examples: pd.DataFrame, items: pd.DataFrame) -> CatalogTask:
    """The task of examples split into 'train' (fitting rows) and 'test' (held out)."""
    catalog = items.drop_duplicates("item_id").reset_index(drop=True)
    kind = "int64" if pd.api.types.is_integer_dtype(catalog["item_id"]) else "string"
    vocab = Vocab.fit(catalog["item_id"], kind=kind)   # item id → catalog column + 1 (0: not in catalog)
    train = examples[examples["split"] == "train"]
    task = holdout(train, examples[examples["split"] == "test"], lambda ids: vocab.lookup(ids) - 1)
    return CatalogTask(catalog=catalog, queries=task.queries, seen=task.seen, relevant=task.relevant,
                       train_cols=vocab.lookup(train["item_id"]) - 1,
                       train_pairs=(pd.factorize(task.fitted["user_id"])[0], task.fitted["col"].to_numpy()))


def sample_queries(task: CatalogTask, max_users: int | None) -> CatalogTask:
    """The task on at most max_users of its queried users (all of them when fewer or None): those
    whose ids hash lowest, so the same users stay in as the data grows and every model scored on
    the returned task sees the same ones. Full-catalog scoring costs queries × items per model;
    with both growing with the data that is quadratic (1M users × 200k items at 10M interactions).
    The training part (popularity, EASE's fit) is kept whole."""
    if max_users is None or task.n_users <= max_users:
        return task
    ids = task.queries["user_id"].astype(str).to_numpy(dtype=object)
    keep = np.sort(np.argsort(pd.util.hash_array(ids), kind="stable")[:max_users])
    new_row = np.full(task.n_users, -1, dtype=np.int64)
    new_row[keep] = np.arange(len(keep))

    def pick(pairs: Pairs) -> Pairs:
        rows = new_row[pairs[0]]
        kept = rows >= 0
        return rows[kept], pairs[1][kept]

    return replace(task, queries=task.queries.iloc[keep].reset_index(drop=True),
                   seen=pick(task.seen), relevant=pick(task.relevant))
