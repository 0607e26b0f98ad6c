"""Full-catalog ranking metrics (models/metrics.py) on hand-made rankings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import METRICS, catalog_figures, full_catalog_metrics, paired_errors, ranking_metrics, relevant_counts, top_k


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


def test_relevant_counts_from_pairs_equal_the_bool_matrix_sums_with_repeated_pairs():
    """The per-row counts full_catalog_metrics takes from a batch's pairs are those of the bool matrix
    the pairs mark: a pair listed twice counts once (fails without the dedup)."""
    rng = np.random.default_rng(1)
    n_rows, n_cols = 9, 40
    rows = torch.from_numpy(rng.integers(0, n_rows, 300))
    cols = torch.from_numpy(rng.integers(0, n_cols, 300))
    tail = torch.from_numpy(rng.random(n_cols) < 0.7)
    marked = torch.zeros((n_rows, n_cols), dtype=torch.bool)
    marked[rows, cols] = True
    n_rel, by_group = relevant_counts(rows, cols, n_rows, n_cols, {"tail": tail})
    n_tail = by_group["tail"]
    assert len(rows) > int(marked.sum())                     # some pairs repeat
    assert torch.equal(n_rel, marked.sum(dim=1))
    assert torch.equal(n_tail, (marked & tail).sum(dim=1))
    assert relevant_counts(rows[:0], cols[:0], 3, n_cols)[0].tolist() == [0, 0, 0]
    # ranking_metrics gives the same figures with the counts as from the matrix alone
    top = torch.from_numpy(np.argsort(rng.random((n_rows, n_cols)), axis=1)[:, :10])
    given = ranking_metrics(top, marked, [5, 10], {"tail": tail}, (n_rel, by_group))
    counted = ranking_metrics(top, marked, [5, 10], {"tail": tail})
    assert given.keys() == counted.keys()
    assert all(torch.allclose(given[k], counted[k], equal_nan=True) for k in given)


def test_the_scorers_tensor_is_left_alone_and_its_precision_kept():
    """The batches are scored in a reused buffer: a scorer handing out views of its own matrix gets it
    back untouched (the seen items' -inf goes to the copy), and float64 scores stay float64 (two
    items 1e-12 apart keep their order; a float32 buffer would tie them and the lower column wins)."""
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 0.5], [0.2, 0.1, 0.3], [0.3, 0.2, 0.1]], dtype=torch.float64)
    kept = scores.clone()
    seen = (np.array([1, 2]), np.array([2, 0]))
    relevant = (np.array([0, 1, 2]), np.array([1, 0, 1]))
    m = full_catalog_metrics(lambda s, e: scores[s:e], 3, 3, seen, relevant, ks=[1], batch_size=2)
    assert torch.equal(scores, kept)
    # user 0: item 1 by 1e-12 (hit); user 1: item 2 seen, item 0 next (hit); user 2: item 0 seen, item 1 (hit)
    assert m["recall@1"] == 1.0


def test_top_k_of_scores_with_nan_and_both_infinities():
    """NaN ranks as -inf (torch.topk would put it first); +inf beside -inf (their sum is NaN too) keeps its order."""
    inf = float("inf")
    scores = torch.tensor([[inf, -inf, 0.5, 0.1], [float("nan"), 0.2, -inf, 0.3]])
    assert top_k(scores, 3).tolist() == [[0, 2, 3], [3, 1, 0]]     # NaN is -inf: tied with item 2, the lower column


def test_standard_errors_are_the_users_spread_over_root_n_in_any_batching():
    """catalog_figures' errors: each figure's per-user values (ranking_metrics on the whole matrix)
    give std(ddof=1) / sqrt(n), whatever the batch size; coverage has none, nor a group of one user."""
    gen = torch.Generator().manual_seed(3)
    n_users, n_items = 37, 12
    scores = torch.rand((n_users, n_items), generator=gen)
    rel = torch.rand((n_users, n_items), generator=gen) < 0.2
    rel[torch.arange(n_users), torch.randint(0, n_items, (n_users,), generator=gen)] = True   # >= 1 each
    cold = torch.zeros(n_items, dtype=torch.bool)
    cold[5] = True
    rel[:, 5] = False
    rel[4, 5] = True                                    # one user with a cold item: no error for it
    rows, cols = (x.numpy() for x in rel.nonzero(as_tuple=True))
    none = (np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    per_user = ranking_metrics(top_k(scores, 5), rel, [5], {"cold": cold})
    for batch_size in (1, 8, 64):
        means, errors, users = catalog_figures(lambda s, e: scores[s:e], n_users, n_items, none, (rows, cols), [5],
                                               metrics=METRICS, groups={"tail": np.zeros(n_items, bool),
                                                                        "cold": cold.numpy()},
                                               batch_size=batch_size, per_user=True)
        for name in ("recall@5", "ndcg@5", "hitrate@5"):
            values = per_user[name].numpy()
            assert means[name] == pytest.approx(values.mean())
            assert errors[name] == pytest.approx(values.std(ddof=1) / math.sqrt(n_users))
            assert np.allclose(users[name], values, atol=1e-7)      # per user, in query order
        assert np.isnan(users["cold_recall@5"]).sum() == n_users - 1 and "coverage@5" not in users
        assert "coverage@5" in means and "coverage@5" not in errors
        assert "cold_recall@5" in means and "cold_recall@5" not in errors     # one user
        assert "tail_recall@5" not in means and "tail_recall@5" not in errors  # nobody


def test_paired_errors_are_the_spread_of_the_per_user_differences():
    a = {"ndcg@5": np.array([0.1, 0.5, 0.3, np.nan], np.float32), "only_a": np.zeros(4, np.float32)}
    b = {"ndcg@5": np.array([0.2, 0.5, 0.6, 0.9], np.float32)}
    diff = np.array([0.1, 0.0, 0.3])                  # the user without a figure in a is left out
    assert paired_errors(a, b) == {"ndcg@5": pytest.approx(diff.std(ddof=1) / math.sqrt(3), rel=1e-5)}
    assert paired_errors(a, a) == {"ndcg@5": 0.0, "only_a": 0.0}
