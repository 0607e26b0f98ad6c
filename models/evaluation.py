"""The offline evaluation report: the two-tower model and the baselines (most popular, EASE) ranked
on one held-out catalog task (models/holdout.py) with the full-catalog metrics (models/metrics.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from models.baselines import ease_baseline, most_popular_scores
from models.errors import ModelError
from models.holdout import CatalogTask
from models.inference import TwoTowerBundle
from models.metrics import Scorer, pairs_by_row, rows_between, scored_batches, scorer_figures, top_k
from models.params import EvaluateParams


def finite_vectors(vectors: np.ndarray, what: str) -> torch.Tensor:
    """The vectors as a tensor; a ModelError when any is NaN or ±inf. A diverged model would otherwise
    be scored (NaN scores rank last) and published with metrics that look merely bad."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ModelError(f"the model is not finite: {int(bad.sum())} of {len(vectors)} {what} vectors hold "
                         "NaN or inf (its weights diverged in training); retrain it with a lower train.lr "
                         "or look for extreme values in the input features")
    return torch.from_numpy(vectors)


def two_tower_scorer(bundle: TwoTowerBundle, task: CatalogTask) -> Scorer:
    user_vecs = finite_vectors(bundle.encode_users(task.queries), "user")    # (U, D)
    item_vecs = finite_vectors(bundle.encode_items(task.catalog), "item")    # (I, D)
    return lambda s, e: user_vecs[s:e] @ item_vecs.T                         # (b, I)


def most_popular_scorer(task: CatalogTask) -> Scorer:
    popularity = most_popular_scores(task.train_cols[task.train_cols >= 0], task.n_items)  # (I,)
    return lambda s, e: popularity.expand(e - s, -1)                     # (b, I)


def evaluation_report(eval_cfg: EvaluateParams, task: CatalogTask, bundle: TwoTowerBundle,
                      examples: pd.DataFrame, items: pd.DataFrame,
                      per_user: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """({"two_tower": {...}, "most_popular": {...}, "ease": {...}, "ease_lambda", "ease_validation",
    "standard_errors", "n_users", "n_items", "n_tail_items", "n_cold_held_out"}, the two-tower's
    per-user figures when per_user, else {}); each model's metrics are recall, ndcg, hitrate,
    coverage, tail_recall and cold_recall at every K of eval_cfg.ks (see metrics.scorer_metrics);
    "standard_errors" holds each model's figures' standard errors (scorer_figures). `examples` and
    `items` are the task's source rows (EASE tunes λ on a split of their training part)."""
    ks = sorted(set(eval_cfg.ks))
    tail = task.tail(eval_cfg.tail_share)
    result: dict = {}
    errors: dict = {}
    two_tower = scorer_figures(eval_cfg, task, two_tower_scorer(bundle, task), per_user=per_user)
    result["two_tower"], errors["two_tower"] = two_tower.means, two_tower.errors
    result["most_popular"], errors["most_popular"], _ = scorer_figures(eval_cfg, task, most_popular_scorer(task))
    result.update(ease_baseline(eval_cfg, task, examples, items, ks))
    if "ease_standard_errors" in result:
        errors["ease"] = result.pop("ease_standard_errors")
    result["standard_errors"] = errors
    result["n_users"] = task.n_users
    result["n_items"] = task.n_items
    result["n_tail_items"] = int(tail.sum())
    result["n_cold_held_out"] = task.cold_held_out()
    return result, two_tower.users


def holdout_recommendations(bundle: TwoTowerBundle, task: CatalogTask, k: int,
                            batch_size: int = 512) -> pd.DataFrame:
    """Each queried user's top-k catalog items, ranked as the metrics rank them (the user's training
    items excluded), plus the held-out items outside that top k with their scores, so that a report
    computing recall from these rows sees every relevant item. Columns: user_id, item_id, rank
    (1..k; <NA> outside the top k), score, target (1: held out, the item to find); sorted by user
    query order, then rank."""
    scorer = two_tower_scorer(bundle, task)
    k = min(k, task.n_items)
    rel_rows, rel_cols = pairs_by_row(task.relevant)
    parts = []
    for start, end, s in scored_batches(scorer, task.n_users, task.n_items, pairs_by_row(task.seen), batch_size):
        top = top_k(s, k)                                                    # (b, k)
        users = torch.arange(start, end).repeat_interleave(k)                # (b·k,)
        ranks = torch.arange(1, k + 1).repeat(end - start)                   # (b·k,)
        top_scores = s.gather(1, top).reshape(-1)                            # (b·k,)
        keep = torch.isfinite(top_scores)    # a user who had seen nearly everything: fewer than k left
        in_rel = rows_between(rel_rows, start, end)
        parts.append(pd.DataFrame({"row": users[keep].numpy(), "col": top.reshape(-1)[keep].numpy(),
                                   "rank": ranks[keep].numpy(), "score": top_scores[keep].numpy()}))
        parts.append(pd.DataFrame({"row": rel_rows[in_rel].numpy(), "col": rel_cols[in_rel].numpy(), "rank": 0,
                                   "score": s[rel_rows[in_rel] - start, rel_cols[in_rel]].numpy()}))
    return _recs_frame(pd.concat(parts, ignore_index=True), task)


def _recs_frame(pairs: pd.DataFrame, task: CatalogTask) -> pd.DataFrame:
    """(row, col, rank, score) pairs, top-k rows before held-out rows → the recommendations frame."""
    relevant = pd.MultiIndex.from_arrays([np.asarray(a) for a in task.relevant])
    pairs = pairs.drop_duplicates(["row", "col"], keep="first")              # a found item: keep its rank
    target = pd.MultiIndex.from_frame(pairs[["row", "col"]]).isin(relevant)
    pairs = pairs.assign(rank=pairs["rank"].astype("Int32").replace(0, pd.NA), target=target.astype("int8"))
    pairs = pairs.sort_values(["row", "rank", "score"], ascending=[True, True, False], na_position="last",
                              kind="stable")
    return pd.DataFrame({
        "user_id": task.queries["user_id"].to_numpy()[pairs["row"].to_numpy()],
        "item_id": task.catalog["item_id"].to_numpy()[pairs["col"].to_numpy()],
        "rank": pairs["rank"].array,
        "score": pairs["score"].to_numpy(dtype="float32"),
        "target": pairs["target"].to_numpy(),
    })
