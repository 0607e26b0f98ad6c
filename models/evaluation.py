"""The offline evaluation report: the two-tower model and the baselines (most popular, EASE) ranked
on one held-out catalog task (models/holdout.py) with the full-catalog metrics (models/metrics.py)."""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from models.baselines import ease_baseline, most_popular_scores
from models.holdout import CatalogTask
from models.inference import TwoTowerBundle
from models.metrics import METRICS, full_catalog_metrics, rounded
from models.params import EvaluateParams

Scorer = Callable[[int, int], torch.Tensor]     # scores(start, end) → (end - start, n_items) of those queries


def two_tower_scorer(bundle: TwoTowerBundle, task: CatalogTask) -> Scorer:
    user_vecs = torch.from_numpy(bundle.encode_users(task.queries))      # (U, D)
    item_vecs = torch.from_numpy(bundle.encode_items(task.catalog))      # (I, D)
    return lambda s, e: user_vecs[s:e] @ item_vecs.T                     # (b, I)


def most_popular_scorer(task: CatalogTask) -> Scorer:
    popularity = most_popular_scores(task.train_cols[task.train_cols >= 0], task.n_items)  # (I,)
    return lambda s, e: popularity.expand(e - s, -1)                     # (b, I)


def evaluation_report(eval_cfg: EvaluateParams, task: CatalogTask, bundle: TwoTowerBundle,
                      examples: pd.DataFrame, items: pd.DataFrame) -> dict:
    """{"two_tower": {...}, "most_popular": {...}, "ease": {...}, "ease_lambda", "ease_validation",
    "n_users", "n_items", "n_tail_items"}; each model's metrics are recall, ndcg, hitrate, coverage and
    tail_recall at every K of eval_cfg.ks. `examples` and `items` are the task's source rows (EASE
    tunes λ on a split of their training part)."""
    ks = sorted(set(eval_cfg.ks))
    tail = task.tail(eval_cfg.tail_share)
    scorers = {"two_tower": two_tower_scorer(bundle, task), "most_popular": most_popular_scorer(task)}
    result: dict = {name: rounded(full_catalog_metrics(fn, task.n_users, task.n_items, task.seen, task.relevant,
                                                       ks, metrics=METRICS, tail=tail))
                    for name, fn in scorers.items()}
    result.update(ease_baseline(eval_cfg, task, examples, items, ks))
    result["n_users"] = task.n_users
    result["n_items"] = task.n_items
    result["n_tail_items"] = int(tail.sum())
    return result
