"""Full-catalog ranking metrics (models/metrics.py) on hand-made rankings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import full_catalog_metrics, ranking_metrics


def test_recall_and_ndcg_on_a_hand_made_ranking():
    top = torch.tensor([[2, 0, 4, 1, 3]])
    relevant = torch.zeros((1, 5), dtype=torch.bool)
    relevant[0, [0, 3]] = True
    m = ranking_metrics(top, relevant, [2, 5])
    d = lambda rank: 1 / math.log2(rank + 1)  # noqa: E731  (1-based rank)
    assert m["recall@2"].item() == pytest.approx(0.5)
    assert m["ndcg@2"].item() == pytest.approx(d(2) / (d(1) + d(2)))
    assert m["recall@5"].item() == pytest.approx(1.0)
    assert m["ndcg@5"].item() == pytest.approx((d(2) + d(5)) / (d(1) + d(2)))


def test_full_catalog_metrics_excludes_seen_items_and_averages_users():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    seen = (np.array([0]), np.array([0]))               # user 0 already had item 0
    relevant = (np.array([0, 1]), np.array([2, 0]))     # user 0 wants item 2, user 1 wants item 0
    m = full_catalog_metrics(lambda s, e: scores[s:e], 2, 4, seen, relevant, ks=[2], batch_size=1)
    # user 0: item 0 removed, ranking 1, 2 -> hit at rank 2 (without the exclusion: 0, 1 -> miss);
    # user 1: ranking 3, 2 -> miss
    assert m == {"recall@2": 0.5, "ndcg@2": pytest.approx(0.5 * (1 / math.log2(3)))}
    # a catalog smaller than K still scores
    m10 = full_catalog_metrics(lambda s, e: scores[s:e], 2, 4, seen, relevant, ks=[10])
    assert m10["recall@10"] == 1.0


def test_pairs_in_any_order_give_the_batch_size_independent_metrics():
    """Seen and held-out pairs are sliced per batch after one sort by user: their order and the batch
    size must not change a figure."""
    rng = np.random.default_rng(0)
    n_users, n_items = 37, 50
    scores = torch.from_numpy(rng.normal(size=(n_users, n_items)).astype(np.float32))
    pairs = np.unique(rng.integers(0, [n_users, n_items], size=(400, 2)), axis=0)
    seen, relevant = (pairs[:200, 0], pairs[:200, 1]), (pairs[200:, 0], pairs[200:, 1])
    kw = dict(ks=[5, 10], metrics=("recall", "ndcg", "coverage"))
    one = full_catalog_metrics(lambda s, e: scores[s:e], n_users, n_items, seen, relevant, batch_size=n_users, **kw)
    mixed = full_catalog_metrics(lambda s, e: scores[s:e], n_users, n_items,
                                 *(tuple(a[order] for a in p) for p in (seen, relevant)
                                   for order in [rng.permutation(len(p[0]))]),
                                 batch_size=4, **kw)
    assert mixed == pytest.approx(one)
    assert one["recall@10"] > 0
