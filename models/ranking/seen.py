"""Which users and items the training requests showed, and how a ranker does on the others.

A ranker is trained on the logged requests, but it serves new users and new items too (a query never
logged, a document added yesterday). The id embeddings of what training never showed carry nothing
(`RelevanceTower.forget` zeroes them), so those are scored from their features alone; this module
finds them, decides whether ids are worth learning at all, and measures NDCG separately on both sides.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.ranking.catalog import RankFeatures
from models.ranking.data import RankBatch
from models.ranking.evaluate import mean_ndcg, ndcg, truth_column
from models.ranking.params import RankParams
from models.ranking.lambdarank import LambdaRanker
from models.ranking.ranker import Ranker

# An id shown fewer times than this in training (the median item) is not worth an embedding when the
# item has features: at a median of ~10 impressions, item ids cost NDCG@10 on the demo (PAL 0.940 vs
# 0.944 features-only; 0.922 vs 0.934 on a 3% log) and on 3,000 feature-described items (0.877 vs 0.937).
MIN_ID_IMPRESSIONS = 30
MIN_LIST = 2                 # a sub-list of one item ranks perfectly whatever the model: not counted


@dataclass(frozen=True)
class Seen:
    users: np.ndarray        # (U,) bool by vocabulary index: the user has a training request
    items: np.ndarray        # (I,) bool: the item was shown in a training request
    item_impressions: np.ndarray   # (I,) training impressions per item

    def ids_worth_learning(self, has_item_features: bool) -> bool:
        """Whether the id embeddings are worth having (rank.features_only: auto): without item features
        they are all there is; with them, only when the typical shown item was shown often enough."""
        shown = self.item_impressions[self.items]
        return not has_item_features or (len(shown) > 0 and float(np.median(shown)) >= MIN_ID_IMPRESSIONS)


def id_report(seen: Seen, ids: bool, cfg: RankParams, features: RankFeatures) -> dict[str, Any]:
    """What the relevance tower read (ranking.json): item ids or features only (and why), and how much
    training showed."""
    shown = seen.item_impressions[seen.items]
    return {"id_embeddings": ids, "features_only": cfg.features_only, "id_dropout": cfg.id_dropout,
            "item_numeric": features.numeric_names, "retrieval_embeddings": features.item_vectors.shape[1] > 0,
            "training_items": int(seen.items.sum()), "training_users": int(seen.users.sum()),
            "median_item_impressions": float(np.median(shown)) if len(shown) else 0.0}


def seen_in(batches: Iterable[RankBatch], n_users: int, n_items: int) -> Seen:
    """One pass over the training requests."""
    users, impressions = np.zeros(n_users, bool), np.zeros(n_items, np.int64)
    for b in batches:
        users[b.user.numpy()] = True
        impressions += np.bincount(b.item.numpy()[b.mask.numpy()], minlength=n_items)
    users[0] = False                                   # OOV is never "seen"
    impressions[0] = 0
    return Seen(users, impressions > 0, impressions)


def split_ndcg(model: Ranker | LambdaRanker, batches: Iterable[RankBatch], seen: Seen, k: int = 10,
               truth: str = "relevance") -> dict[str, dict[str, float | int]]:
    """NDCG@k of the serving order on held-out requests, split four ways: among each list's items seen
    in training / unseen (each sub-list of at least MIN_LIST items ranked on its own), and over the
    requests of users seen / unseen in training. {"items_seen": {"ndcg@k", "requests"}, ...}."""
    return ndcg_and_split(model, batches, seen, k, truth)[1]


def ndcg_and_split(model: Ranker | LambdaRanker, batches: Iterable[RankBatch], seen: Seen, k: int = 10,
                   truth: str = "relevance") -> tuple[float, dict[str, dict[str, float | int]]]:
    """(evaluate.relevance_ndcg, split_ndcg) from one pass over the batches: the model scores each
    held-out request once (a pass over a 2.8M-impression test log is 2.4 s of a network's measure)."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("items_seen", "items_unseen", "users_seen", "users_unseen")}
    every: list[torch.Tensor] = []
    with torch.no_grad():
        for b in batches:
            scores, gains = model.ranking_scores(b), truth_column(b, truth)
            every.append(ndcg(scores, gains, b.mask, k))
            item_seen = torch.from_numpy(seen.items[b.item.numpy()]) & b.mask                # (R, L)
            for name, mask in (("items_seen", item_seen), ("items_unseen", b.mask & ~item_seen)):
                full = mask.sum(dim=1) >= MIN_LIST
                parts[name].append(ndcg(scores[full], gains[full], mask[full], k))
            user_seen = torch.from_numpy(seen.users[b.user.numpy()])                          # (R,)
            for name, rows in (("users_seen", user_seen), ("users_unseen", ~user_seen)):
                parts[name].append(ndcg(scores[rows], gains[rows], b.mask[rows], k))
    out: dict[str, dict[str, float | int]] = {}
    for name, values in parts.items():
        v = torch.cat(values) if values else torch.zeros(0)
        v = v[~v.isnan()]
        out[name] = {f"ndcg@{k}": float(v.mean()) if len(v) else float("nan"), "requests": int(len(v))}
    return mean_ndcg(torch.cat(every).numpy() if every else np.empty(0)), out
