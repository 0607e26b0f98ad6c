"""The LTR-shaped world (flows/experiments/ltr_data.py) has the documented shape, and the benchmark runs
the rank stage's functions on it end to end (a tiny world: the figures are checked for sanity only)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flows.experiments.ltr_bench import (DEBIASED_GBM, IPW_LISTWISE, LABELS, LISTWISE, LOGGERS, NAIVE_GBM,
                                         NET_LABELS, RANDOM, SERVED, TRUE_CURVE, ListwiseClicks, loggers_named,
                                         ltr_bench, ndcg_by_query, targets)
from flows.experiments.ltr_data import Logger, LtrShape, click_log, generate, write_ingested
from models.ranking.params import RankParams

torch.set_num_threads(1)
SMALL = LtrShape(queries=60, docs_min=8, docs_max=12, features=12, informative=6, sessions=4)


def test_the_world_has_graded_labels_numeric_documents_and_held_out_queries() -> None:
    world = generate(SMALL, 0)
    docs = world.docs
    assert set(docs["label"]) == {0, 1, 2}
    shares = docs["label"].value_counts(normalize=True)
    assert shares[0] == pytest.approx(0.6, abs=0.02) and shares[1] == pytest.approx(0.3, abs=0.02)
    features = [c for c in docs.columns if c not in ("item_id", "user_id", "label")]
    assert len(features) == SMALL.features + SMALL.query_features
    assert all(pd.api.types.is_float_dtype(docs[c]) for c in features)
    sizes = docs.groupby("user_id").size()
    assert sizes.min() >= SMALL.docs_min and sizes.max() <= SMALL.docs_max and len(sizes) == SMALL.queries
    assert docs["item_id"].is_unique                      # a query-document pair is an item
    held = world.held_out
    logged = set(world.queries.loc[world.queries["logged"], "user_id"])
    assert 0.5 < len(logged) / SMALL.queries < 0.9 and not set(held["user_id"]) & logged
    # the label is a function of the features: the informative ones correlate with it
    corr = [abs(np.corrcoef(docs[f"f{j}"].rank(), docs["label"])[0, 1]) for j in range(SMALL.features)]
    assert max(corr) > 0.2


@pytest.mark.parametrize("logger", [Logger(0.0, False), Logger(0.9, True)])
def test_the_log_shows_every_document_of_logged_queries_only(logger: Logger) -> None:
    world = generate(SMALL, 0)
    logs, truth = click_log(world, SMALL, logger, seed=0)
    logged = world.queries.loc[world.queries["logged"], "user_id"]
    assert set(logs["user_id"]) == set(logged)
    assert logs["request_id"].nunique() == len(logged) * SMALL.sessions
    assert not set(logs["item_id"]) & set(world.held_out["item_id"])     # held-out documents never shown
    assert logs.groupby("request_id")["position"].max().equals(logs.groupby("request_id").size())
    assert set(truth["user_type"]) == {"patient", "impatient"} and len(truth) == len(logs)
    top = logs.merge(world.docs[["item_id", "label"]])
    first, deep = top[top["position"] == 1], top[top["position"] >= 5]
    assert first["clicked"].mean() > deep["clicked"].mean()              # position bias
    if logger.persistent:   # a logger that repeats its order: the same document at the same place
        assert (logs.groupby(["user_id", "item_id"])["position"].nunique() == 1).all()
        assert first["label"].mean() > top["label"].mean() + 0.3          # and it knew the labels


def test_ndcg_uses_exponential_gains_per_query() -> None:
    held = pd.DataFrame({"user_id": ["a"] * 3 + ["b"] * 2, "item_id": range(5), "label": [0, 2, 1, 0, 0]})
    assert ndcg_by_query(held, np.array([0.0, 2.0, 1.0, 5.0, 4.0])) == pytest.approx(1.0)   # b has no gain: left out
    # order 0, 2, 1 of a: gains 0, 1, 3 at ranks 1..3 over the ideal 3, 1
    expected = (1 / np.log2(3) + 3 / np.log2(4)) / (3 + 1 / np.log2(3))
    assert ndcg_by_query(held, np.array([2.0, 0.0, 1.0, 0.0, 0.0])) == pytest.approx(expected)


def test_the_bench_measures_every_row_and_the_served_ranker(tmp_path: Path) -> None:
    pytest.importorskip("lightgbm", minversion="4.1")
    cfg = RankParams(models=["naive", "pal"], epochs=1, lightgbm_rounds=10)
    shape = LtrShape(queries=40, docs_min=8, docs_max=12, features=12, informative=6, sessions=3)
    doc = ltr_bench(cfg, shape, [0], tmp_path, loggers=(Logger(0.0, False),), diagnostics=True)
    (run,) = doc["runs"]
    rows = run["rows"]
    assert set(rows) == {RANDOM, "naive", "pal", DEBIASED_GBM, NAIVE_GBM, LABELS, SERVED, TRUE_CURVE, NET_LABELS,
                         LISTWISE, IPW_LISTWISE}
    assert all(0 < v <= 1 for v in rows.values())
    served = {"lightgbm": DEBIASED_GBM, "lightgbm_naive": NAIVE_GBM}.get(run["served"], run["served"])
    assert rows[SERVED] == pytest.approx(rows[served], abs=1e-6)        # rank score reads what was chosen
    assert rows[LABELS] > rows[RANDOM]
    assert run["relevance_features"] is True                          # ~4 impressions per document: no ids
    saved = json.loads((tmp_path / "rank_ltr.json").read_text())
    assert saved["targets"]["random"]["served_vs"] == DEBIASED_GBM and (tmp_path / "rank_ltr.md").is_file()


def test_targets_name_the_rows_that_close_most_of_the_gap() -> None:
    rows = {RANDOM: 0.36, "naive": 0.60, "pal": 0.71, "additive": 0.69, DEBIASED_GBM: 0.62, NAIVE_GBM: 0.61,
            LABELS: 0.80, SERVED: 0.71}
    summary = {"random": {r: {"mean": v, "std": 0.0, "n": 1} for r, v in rows.items()}}
    out = targets(summary)["random"]
    assert out["gap_closed"]["pal"] == pytest.approx(0.55) and out["gap_closed"]["additive"] == pytest.approx(0.45)
    assert out["most_of_gap_closed_by"] == ["pal", SERVED] and out["met"] and out["served_vs"] == DEBIASED_GBM


def test_logger_choice_names_the_simulated_loggers() -> None:
    assert loggers_named("both") == LOGGERS
    assert [lg.name for lg in loggers_named("random")] == ["random"]
    assert [lg.persistent for lg in loggers_named("confounding")] == [True]
    with pytest.raises(ValueError, match="choose one of random, confounding, both"):
        loggers_named("good")


def test_the_listwise_diagnostic_weights_each_click_by_its_inverse_propensity() -> None:
    from models.ranking.config import RankerConfig
    from models.ranking.data import RankBatch

    cfg = RankerConfig(n_users=3, n_items=5, item_numeric=0, user_vector_dim=0, item_vector_dim=0)
    batch = RankBatch(user=torch.tensor([1]), item=torch.tensor([[1, 2, 3]]), position=torch.tensor([[1, 2, 3]]),
                      context=torch.zeros((1, 3, 0), dtype=torch.long), clicked=torch.tensor([[0.0, 0.0, 1.0]]),
                      mask=torch.ones((1, 3), dtype=torch.bool))
    torch.manual_seed(0)
    plain = ListwiseClicks(cfg, None)
    torch.manual_seed(0)
    weighted = ListwiseClicks(cfg, None, np.array([1.0, 0.5, 0.25]))
    # one click, at position 3 (examined 1 time in 4): the same softmax term, 4 times the weight
    assert plain.loss(batch).item() > 0
    assert weighted.loss(batch).item() == pytest.approx(4 * plain.loss(batch).item(), rel=1e-5)
