"""Baselines (most popular, EASE), the extended ranking metrics, and the protocol calibration."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models import baselines
from models.baselines import (FLOAT64_MAX_ITEMS, binary_matrix, ease_baseline, ease_dtype, ease_memory_gb, ease_scorer,
                              ease_weights, gram, item_components, most_popular_scores)
from models.holdout import catalog_task
from models.metrics import full_catalog_metrics, tail_items, top_k
from models.params import EvaluateParams, SplitParams
from models.split import temporal_split
from training_data import synthetic_training_dir


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_most_popular_scores_count_training_interactions():
    assert most_popular_scores(np.array([2, 2, 0, 2]), 4).tolist() == [1.0, 0.0, 3.0, 0.0]


# --- EASE --------------------------------------------------------------------------------------

def test_ease_equals_ridge_regression_of_each_item_on_the_others():
    """EASE's closed form vs. the problem it solves: column j of B is the ridge regression of item j
    on every other item (diag(B) = 0), solved here directly, one column at a time."""
    rng = np.random.default_rng(0)
    dense = (rng.random((40, 7)) < 0.35).astype(np.float64)
    rows, cols = dense.nonzero()
    x = binary_matrix(np.r_[rows, rows[:5]], np.r_[cols, cols[:5]], 40, 7)   # repeats count once
    np.testing.assert_array_equal(x.toarray(), dense)
    np.testing.assert_array_equal(gram(x, block_users=3), dense.T @ dense)   # summed over user blocks
    lam = 3.0
    b = ease_weights(gram(x), lam)
    expected = np.zeros((7, 7))
    for j in range(7):
        others = [i for i in range(7) if i != j]
        xo = dense[:, others]
        expected[others, j] = np.linalg.solve(xo.T @ xo + lam * np.eye(6), xo.T @ dense[:, j])
    np.testing.assert_allclose(b, expected, atol=1e-10)
    assert np.all(np.diag(b) == 0)
    with pytest.raises(ValueError, match="λ > 0"):
        ease_weights(gram(x), 0.0)


@pytest.mark.parametrize("density", [0.02, 0.6])
def test_the_gram_matrix_is_exact_whether_blocks_are_scattered_or_added_dense(density):
    """Sparse blocks (0.02: a block's XᵀX has far fewer entries than I²) are added entry by entry,
    dense ones (0.6) through a dense copy: both give XᵀX exactly, over blocks of 16 users."""
    rng = np.random.default_rng(3)
    dense = (rng.random((200, 50)) < density).astype(np.float64)
    rows, cols = dense.nonzero()
    x = binary_matrix(rows, cols, 200, 50)
    block_nnz = (x[:16].T @ x[:16]).nnz
    assert (block_nnz * baselines.SCATTER_MAX_SHARE > 50 * 50) == (density > 0.5)   # each path is taken
    np.testing.assert_array_equal(gram(x, block_users=16), dense.T @ dense)


def test_ease_solved_per_component_equals_the_whole_inverse(monkeypatch):
    """Items that no user links (directly or through other items) form blocks of XᵀX: each block is
    inverted on its own. Here: two groups of users over disjoint item sets, a linking user that joins
    two groups into one, an item only seen alone, and items no user has."""
    rng = np.random.default_rng(1)
    n_items = 30
    dense = np.zeros((60, n_items))
    dense[:20, :8] = rng.random((20, 8)) < 0.4          # component A: items 0-7
    dense[20:40, 8:20] = rng.random((20, 12)) < 0.3     # component B: items 8-19 ...
    dense[40:55, 20:25] = rng.random((15, 5)) < 0.5     # ... joined to items 20-24 by user 55
    dense[55, [9, 21]] = 1.0
    dense[56:58, 25] = 1.0                              # item 25: seen, but never with another item
    dense[58:, :] = 0.0                                 # items 26-29: no user at all
    dense[:, 26:] = 0.0
    rows, cols = dense.nonzero()
    x = binary_matrix(rows, cols, 60, n_items)
    labels = item_components(x)
    assert len(set(labels[:8])) == 1 and len(set(labels[8:25])) == 1 and labels[0] != labels[8]
    assert len(set(labels[25:])) == 5 and not set(labels[25:]) & set(labels[:25])
    g = gram(x)
    inverse, inverted = baselines.spd_inverse, []
    monkeypatch.setattr(baselines, "spd_inverse", lambda a: inverted.append(len(a)) or inverse(a))
    for lam in (0.5, 50.0):
        whole = ease_weights(g, lam)
        inverted.clear()
        blocked = ease_weights(g, lam, labels)
        assert sorted(inverted) == [8, 17]              # the two blocks; nothing for the lone items
        np.testing.assert_allclose(blocked, whole, atol=1e-12)
        assert np.all(blocked[:8, 8:] == 0) and np.all(blocked[25:] == 0) and np.all(blocked[:, 25:] == 0)
    np.testing.assert_array_equal(g, dense.T @ dense)                   # the Gram matrix is left as it was


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_cholesky_inverse_is_the_inverse_in_the_same_memory(monkeypatch, dtype):
    """spd_inverse against numpy's general inverse, with bands of 4 rows so that the mirrored triangle
    crosses several bands and a partial last one; not positive definite: None."""
    monkeypatch.setattr(baselines, "MIRROR_ROWS", 4)
    rng = np.random.default_rng(2)
    x = (rng.random((60, 11)) < 0.3).astype(dtype)
    a = x.T @ x + 2.5 * np.eye(11, dtype=dtype)
    expected = np.linalg.inv(a)
    work = a.copy()
    got = baselines.spd_inverse(work)
    assert np.shares_memory(got, work) and got.flags.c_contiguous and got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 1e-14)
    assert np.array_equal(got, got.T)
    assert baselines.spd_inverse(np.array([[1.0, 2.0], [2.0, 1.0]], dtype=dtype)) is None


def test_ease_falls_back_to_a_general_inverse_when_cholesky_fails(monkeypatch):
    x = binary_matrix(np.array([0, 0, 1, 2, 2, 3]), np.array([0, 1, 1, 2, 0, 3]), 4, 5)
    expected = ease_weights(gram(x), 2.0)
    monkeypatch.setattr(baselines, "spd_inverse", lambda a: None)
    np.testing.assert_allclose(ease_weights(gram(x), 2.0), expected, atol=1e-12)


def test_ease_scores_are_user_rows_times_b_in_float32():
    x = binary_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3, 4)
    b = ease_weights(gram(x), 1.0)
    s = ease_scorer(b, x)(1, 3)
    assert s.dtype == torch.float32 and s.shape == (2, 4)
    np.testing.assert_allclose(s.numpy(), x.toarray()[1:3] @ b, rtol=1e-6)


def test_ease_uses_float32_for_large_catalogs():
    assert ease_dtype(FLOAT64_MAX_ITEMS) is np.float64 and ease_dtype(FLOAT64_MAX_ITEMS + 1) is np.float32
    assert ease_memory_gb(20000) == pytest.approx(3.2)


# --- metrics -------------------------------------------------------------------------------------

def test_top_k_breaks_ties_by_the_lower_column():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0],
                           [0.0, 0.0, 0.0, 0.0, 5.0, float("nan")]])
    assert top_k(scores, 2).tolist() == [[1, 2], [4, 0]]
    assert top_k(scores, 4).tolist() == [[1, 2, 4, 5], [4, 0, 1, 2]]


def test_top_k_equals_a_sort_by_score_then_column_on_rows_with_and_without_ties():
    """The fast path (one top-k set) and the tied path agree with sorting each row by (-score, column),
    on rows with distinct scores, ties inside and across the k-th place, -inf (excluded items), NaN."""
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(40, 50, generator=gen)
    coarse = torch.randint(0, 6, (40, 50), generator=gen).float()          # ties everywhere
    excluded = distinct.clone()
    excluded[:, 3:] = float("-inf")                                       # fewer finite items than k
    nan = distinct.clone()
    nan[::3, ::4] = float("nan")
    for scores in (distinct, coarse, excluded, nan, torch.cat([distinct, coarse])):
        for k in (1, 5, 49, 50):
            clean = torch.nan_to_num(scores, nan=float("-inf"))
            expected = [sorted(range(scores.shape[1]), key=lambda c: (-row[c].item(), c))[:k] for row in clean]
            assert top_k(scores, k).tolist() == expected


def test_hitrate_coverage_and_tail_recall_on_hand_made_rankings():
    # training counts per item 0..4: 4, 3, 2, 1, 0 -> head (top 40%) = items 0, 1
    tail = tail_items(np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3]), 5, head_share=0.4)
    assert tail.tolist() == [False, False, True, True, True]
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0],     # top2 after excluding item 0: 1, 2
                           [5.0, 4.0, 3.0, 2.0, 1.0],     # top2: 0, 1
                           [1.0, 2.0, 3.0, 4.0, 5.0]])    # top2: 4, 3
    seen = (np.array([0]), np.array([0]))
    relevant = (np.array([0, 0, 1, 2]), np.array([2, 3, 4, 0]))
    m = full_catalog_metrics(lambda s, e: scores[s:e], 3, 5, seen, relevant, ks=[2],
                             metrics=("recall", "hitrate", "coverage", "tail_recall"), groups={"tail": tail},
                             batch_size=2)
    assert m["recall@2"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert m["hitrate@2"] == pytest.approx(1 / 3)
    assert m["coverage@2"] == pytest.approx(1.0)            # items 1, 2 | 0, 1 | 4, 3
    # users 0 and 1 have tail targets (user 2 wants only head item 0): (1/2 + 0) / 2
    assert m["tail_recall@2"] == pytest.approx(0.25)
    only_first = full_catalog_metrics(lambda s, e: scores[s:e], 1, 5, seen, (np.array([0]), np.array([2])),
                                      ks=[2], metrics=("coverage",))
    assert only_first == {"coverage@2": pytest.approx(2 / 5)}
    with pytest.raises(ValueError, match="tail"):
        full_catalog_metrics(lambda s, e: scores[s:e], 3, 5, seen, relevant, ks=[2], metrics=("tail_recall",))


# --- λ tuning and the evaluate stage's EASE ------------------------------------------------------

def _numpy_protocol(train: pd.DataFrame, test: pd.DataFrame, catalog: pd.Series, scorer, k: int):
    """Recall@k / NDCG@k written out in plain numpy (dense matrices, stable argsort): the reference
    the stage's batched torch code must agree with."""
    cat = pd.Index(catalog)
    users = pd.Index(sorted(set(train["user_id"]) | set(test["user_id"])))
    x = np.zeros((len(users), len(cat)))
    x[users.get_indexer(train["user_id"]), cat.get_indexer(train["item_id"])] = 1
    t = np.zeros_like(x, dtype=bool)
    t[users.get_indexer(test["user_id"]), cat.get_indexer(test["item_id"])] = True
    t &= x == 0
    s = scorer(x)
    s[x > 0] = -np.inf
    keep = t.sum(1) > 0
    s, t = s[keep], t[keep]
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(t, top, 1)
    n = t.sum(1)
    disc = 1 / np.log2(np.arange(2, k + 2))
    ndcg = (hits * disc).sum(1) / np.cumsum(disc)[np.minimum(n, k) - 1]
    return (hits.sum(1) / n).mean(), ndcg.mean()


def _numpy_ease(lam: float):
    def scorer(x: np.ndarray) -> np.ndarray:
        p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
        b = -p / np.diag(p)
        np.fill_diagonal(b, 0)
        return x @ b
    return scorer


def test_lambda_tuning_picks_the_best_validation_ndcg(tmp_path):
    training, _ = synthetic_training_dir(tmp_path, n_users=150, n_items=80)
    examples = pd.read_parquet(training / "examples.parquet")
    items = pd.read_parquet(training / "items.parquet")
    eval_cfg = EvaluateParams(ks=[10], ease_lambdas=[0.5, 5.0, 50.0, 5000.0])
    out = ease_baseline(eval_cfg, catalog_task(examples, items), examples, items, [10])
    scan = out["ease_validation"]["by_lambda"]
    assert len(set(scan.values())) == 4, scan                     # λ matters on this data
    assert "note" not in out["ease_validation"]
    assert out["ease_lambda"] == max(eval_cfg.ease_lambdas, key=lambda lam: scan[f"{lam:g}"])
    # the validation split is each user's last 20% of their training rows
    train = examples[examples["split"] == "train"].reset_index(drop=True)
    part = temporal_split(train, eval_cfg.validation)
    for lam in eval_cfg.ease_lambdas:
        _, ndcg = _numpy_protocol(train[part == "train"], train[part == "test"], items["item_id"],
                                  _numpy_ease(lam), 10)
        assert scan[f"{lam:g}"] == pytest.approx(ndcg, abs=1e-6)
    # test figures: the chosen λ refit on the whole training part
    recall, ndcg = _numpy_protocol(train, examples[examples["split"] == "test"], items["item_id"],
                                   _numpy_ease(out["ease_lambda"]), 10)
    assert out["ease"]["recall@10"] == pytest.approx(recall, abs=1e-6)
    assert out["ease"]["ndcg@10"] == pytest.approx(ndcg, abs=1e-6)


def test_ease_is_skipped_above_the_catalog_limit(tmp_path):
    training, _ = synthetic_training_dir(tmp_path, n_users=40, n_items=30)
    examples = pd.read_parquet(training / "examples.parquet")
    items = pd.read_parquet(training / "items.parquet")
    out = ease_baseline(EvaluateParams(ease_max_items=29), catalog_task(examples, items), examples, items, [20])
    assert out["ease_lambda"] is None
    assert "30 items > evaluate.ease_max_items=29" in out["ease"]["skipped"]


# --- calibration on the demo split ---------------------------------------------------------------

def test_demo_protocol_reproduces_the_reference_figures(demo_cache: Path):
    """The issue's reference implementation of this protocol measured on the demo split:
    MostPop R@20 0.0959 / NDCG@20 0.1132, EASE (λ=250) R@20 0.1961 / NDCG@20 0.2051 (tolerance ±0.005).
    The demo's interactions with the default temporal split (what the pipeline's examples hold)."""
    from flows.sources.demo import demo_source

    source = demo_source(demo_cache)
    examples = pd.read_parquet(source / "interactions.parquet", columns=["user_id", "item_id", "timestamp"])
    examples["split"] = temporal_split(examples, SplitParams())
    task = catalog_task(examples, pd.read_parquet(source / "items.parquet", columns=["item_id"]))
    n_users, n_items = task.n_users, task.n_items
    pop = most_popular_scores(task.train_cols[task.train_cols >= 0], n_items)
    b = ease_weights(gram(binary_matrix(*task.train_pairs, task.train_pairs[0].max() + 1, n_items)), 250.0)
    scorers = {"most_popular": lambda s, e: pop.expand(e - s, -1),
               "ease": ease_scorer(b, binary_matrix(*task.seen, n_users, n_items))}
    got = {name: full_catalog_metrics(fn, n_users, n_items, task.seen, task.relevant, [20])
           for name, fn in scorers.items()}
    assert got["most_popular"]["recall@20"] == pytest.approx(0.0959, abs=0.005)
    assert got["most_popular"]["ndcg@20"] == pytest.approx(0.1132, abs=0.005)
    assert got["ease"]["recall@20"] == pytest.approx(0.1961, abs=0.005)
    assert got["ease"]["ndcg@20"] == pytest.approx(0.2051, abs=0.005)
    assert not math.isnan(got["ease"]["ndcg@20"])


def test_an_untuned_lambda_says_why_in_the_metrics(tmp_path):
    training, _ = synthetic_training_dir(tmp_path, n_users=60, n_items=40)
    examples = pd.read_parquet(training / "examples.parquet")
    items = pd.read_parquet(training / "items.parquet")
    task = catalog_task(examples, items)
    one = ease_baseline(EvaluateParams(ks=[10], ease_lambdas=[5.0]), task, examples, items, [10])
    assert one["ease_lambda"] == 5.0 and one["ease_validation"]["by_lambda"] == {}
    assert one["ease_validation"]["note"] == ("λ not tuned: one λ in evaluate.ease_lambdas; the first of "
                                              "evaluate.ease_lambdas is used")
    few = EvaluateParams(ks=[10], ease_lambdas=[50.0, 5.0],
                         validation=SplitParams(test_fraction=0.2, min_user_interactions=10_000))
    none = ease_baseline(few, task, examples, items, [10])
    assert none["ease_lambda"] == 50.0 and none["ease_validation"]["users"] == 0
    assert "no user has enough training rows" in none["ease_validation"]["note"]
    assert "min_user_interactions=10000" in none["ease_validation"]["note"]
