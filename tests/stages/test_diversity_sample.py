"""Evidently's Diversity and Serendipity on a sample of users when the catalog or the user count is
large (flows/reports/diversity.py), beside the full quality report's other figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flows.reports.diversity import diversity_sample
from flows.reports.frames import item_feature_vectors
from flows.reports.quality import quality_report

SCHEMA = {"item_features": {"multi": ["genres"], "categorical": [], "numeric": ["price"]}}


def _data(n_users: int = 120, n_items: int = 900, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                          "genres": [["a", "b", "c"][: 1 + i % 3] for i in range(n_items)],
                          "price": rng.random(n_items)})
    users = [f"u{i}" for i in range(n_users)]
    recs = pd.DataFrame({"user_id": np.repeat(users, 25), "item_id": rng.choice(items["item_id"], 25 * n_users),
                         "score": rng.random(25 * n_users), "target": rng.integers(0, 2, 25 * n_users)})
    train = pd.DataFrame({"user_id": rng.choice(users, 40 * n_users), "item_id": rng.choice(items["item_id"], 40 * n_users)})
    return items, recs, train


def test_small_data_is_not_sampled() -> None:
    _, recs, train = _data()
    assert diversity_sample(recs, train, k=20, max_items=900, max_users=120, seed=0) is None


def test_sample_keeps_within_both_caps_and_passes_only_its_users_rows() -> None:
    _, recs, train = _data()
    sample = diversity_sample(recs, train, k=20, max_items=400, max_users=10, seed=0)
    assert 0 < sample.users <= 10 and sample.items <= 400
    chosen = set(sample.recs["user_id"])
    assert len(chosen) == sample.users and set(sample.train["user_id"]) <= chosen
    top = sample.recs[sample.recs.groupby("user_id")["score"].rank(ascending=False) <= 21]
    assert pd.concat([top["item_id"], sample.train["item_id"]]).nunique() == sample.items
    assert "report.max_users_pairwise=10" in sample.note
    again = diversity_sample(recs, train, k=20, max_items=400, max_users=10, seed=0)
    assert set(again.recs["user_id"]) == chosen                         # seeded


def test_sampled_figures_join_the_full_report(tmp_path: Path) -> None:
    items, recs, train = _data()
    sample = diversity_sample(recs, train, k=20, max_items=500, max_users=20, seed=0)
    vectors = item_feature_vectors(items[items["item_id"].isin(pd.concat([sample.recs["item_id"],
                                                                          sample.train["item_id"]]))], SCHEMA)
    figures, not_computed = quality_report(recs, train, vectors, 20, tmp_path / "q.html", diversity=sample)
    assert not not_computed
    assert {"diversity@20", "serendipity@20", "novelty@20", "ndcg@20"} <= set(figures)
    # the other figures are those of every user, as without the sample
    whole, _ = quality_report(recs, train, None, 20, tmp_path / "w.html")
    assert figures["ndcg@20"] == whole["ndcg@20"] and figures["novelty@20"] == whole["novelty@20"]


def test_the_pairwise_reports_hold_one_distance_matrix_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """Diversity and Serendipity each run a report whose snapshot holds an items x items distance
    matrix (1.9 GB of the 1M scale bench's 3.1 GB report stage held two): the first is gone before
    the second is built."""
    import gc
    import weakref

    import flows.reports.quality as quality

    items, recs, train = _data()
    sample = diversity_sample(recs, train, k=20, max_items=500, max_users=20, seed=0)
    vectors = item_feature_vectors(items, SCHEMA)
    earlier: list[weakref.ref] = []
    real_run = quality.Report.run

    def run(self, *args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in earlier), "an earlier pairwise snapshot is still held"
        snapshot = real_run(self, *args, **kwargs)
        earlier.append(weakref.ref(snapshot))
        return snapshot

    monkeypatch.setattr(quality.Report, "run", run)
    figures, failed = quality._pairwise_figures(sample, vectors, 20)
    assert len(earlier) == 2 and not failed and {"diversity@20", "serendipity@20"} <= set(figures)


def test_the_pairwise_report_runs_beside_the_main_one_with_the_same_figures(tmp_path: Path, monkeypatch) -> None:
    """report.workers > 1: Diversity and Serendipity are computed in a forked process while this one runs
    the other figures' report; every figure and the page are those of the one-process run."""
    import os

    import flows.reports.quality as quality

    items, recs, train = _data()
    sample = diversity_sample(recs, train, k=20, max_items=500, max_users=20, seed=0)
    vectors = item_feature_vectors(items, SCHEMA)
    pids = tmp_path / "pids"
    real = quality._pairwise_figures

    def pairwise(*args, **kwargs):
        with pids.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "_pairwise_figures", pairwise)
    one = quality_report(recs, train, vectors, 20, tmp_path / "one.html", diversity=sample, workers=1)
    two = quality_report(recs, train, vectors, 20, tmp_path / "two.html", diversity=sample, workers=2)
    assert one == two and {"diversity@20", "serendipity@20", "ndcg@20"} <= set(two[0])
    first, second = (int(p) for p in pids.read_text().split())
    assert first == os.getpid() and second != os.getpid()
    assert (tmp_path / "two.html").stat().st_size > 0


def test_report_workers_auto_is_two_processes_up_to_a_training_size() -> None:
    from flows.stages.report import AUTO_MAX_TRAIN_ROWS, quality_workers
    from models.cores import usable_cores

    assert quality_workers("auto", 700_000) == min(2, usable_cores())
    assert quality_workers("auto", AUTO_MAX_TRAIN_ROWS + 1) == 1
    assert quality_workers(2, 10 * AUTO_MAX_TRAIN_ROWS) == 2 and quality_workers(1, 10) == 1


def test_the_drift_reports_run_beside_the_quality_report_up_to_a_smaller_training_size() -> None:
    from flows.stages.report import AUTO_MAX_BESIDE_ROWS, drift_beside
    from models.cores import usable_cores

    assert drift_beside("auto", 700_000) == (usable_cores() >= 2)
    assert not drift_beside("auto", AUTO_MAX_BESIDE_ROWS + 1)
    assert drift_beside(2, 10 * AUTO_MAX_BESIDE_ROWS) and not drift_beside(1, 10)
