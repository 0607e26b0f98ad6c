"""LightGBM lambdarank as a served ranker (issue 22): a candidate of rank.serve: auto, saved in the
ranker directory, scored by `towerflow rank score` and by the service's re-ranking like the networks."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tests.models.ranking.rank_simulator import SimConfig, simulate
from tests.stages.test_rank_stage import rank_score_cli, write_ingested

from flows.serving.rerank import RankerCache, rerank_answers
from flows.stages.rank import rank
from models.errors import ModelNotFound
from models.ranking.bundle import load_ranker
from models.ranking.lambdarank import LambdaRanker, feature_rows
from models.ranking.params import RankParams

pytest.importorskip("lightgbm", minversion="4.1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """serve: auto with one barely trained network (one epoch at a tiny learning rate: close to a random
    order) beside LightGBM: LightGBM validates best, so auto must serve it."""
    root = tmp_path_factory.mktemp("gbm")
    ingested = write_ingested(simulate(SimConfig(etas=(2.0, 2.0), logging_strength=0.0, requests=1500, seed=3)),
                              root / "ingested")
    cfg = RankParams(models=["pal"], epochs=1, lr=1e-6, lightgbm_rounds=30, lightgbm_naive=False)
    return root, rank(cfg, 0, ingested, None, root / "ranker", root / "reports" / "ranking.json")


def test_auto_serves_lightgbm_when_it_validates_best(served: tuple[Path, dict]) -> None:
    root, report = served
    serve = report["serve"]
    print(serve["validation"])
    assert set(serve["validation"]) == {"pal", "lightgbm"}
    assert serve["validation"]["lightgbm"] > serve["validation"]["pal"]
    assert report["served"] == serve["served"] == "lightgbm" and serve["warning"] is None
    row = report["models"]["lightgbm"]
    assert row["position_correction"] is True and row["ndcg@10"] > report["models"]["pal"]["ndcg@10"]
    assert set(row["split"]) == {"items_seen", "items_unseen", "users_seen", "users_unseen"}
    files = {p.name for p in (root / "ranker").iterdir()}
    assert {"model.txt", "tables.npz", "ranker.json", "users.parquet", "items.parquet"} <= files
    assert "model.pt" not in files


def test_the_saved_booster_scores_raw_ids_from_features_alone(served: tuple[Path, dict]) -> None:
    root, report = served
    bundle = load_ranker(root / "ranker")
    assert bundle.name == "lightgbm" and isinstance(bundle.model, LambdaRanker)
    assert bundle.meta["chosen_by"] == report["serve"] and bundle.meta["position"] is True
    items = pd.read_parquet(root / "ingested" / "items.parquet")["item_id"].to_numpy()[:20]
    scores = bundle.score(np.array(["u1"] * 20), items)
    assert scores.shape == (20,) and np.isfinite(scores).all() and len(np.unique(scores)) > 5
    # no ids: an unknown user ranks items exactly as a known one (no user features in this log)
    assert np.allclose(bundle.score(np.array(["nobody"] * 20), items), scores)
    # the score is the booster's on the item's feature row: nothing else travels with it
    rows = feature_rows(np.zeros(20, np.int64), bundle.items.lookup(items), bundle.model.tables)
    assert np.allclose(bundle.model.booster.predict(rows), scores, atol=1e-6)


def test_rank_score_and_the_service_use_the_lightgbm_ranker(served: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = served
    scores = rank_score_cli(root, tmp_path, "user_id,item_id\nu1,3\nu1,4\nunknown,5\n")
    expected = load_ranker(root / "ranker").score(np.array(["u1", "u1", "unknown"]), np.array([3, 4, 5]))
    assert np.allclose(scores["score"], expected, atol=1e-5)
    shutil.copytree(root / "ranker", tmp_path / "published" / "versions" / "v1" / "ranker")
    answers = [("u1", False, [(item, 1.0 - r / 100) for r, item in enumerate(range(30))])]
    (_, _, hits), = rerank_answers(answers, RankerCache(tmp_path / "published").get("v1"), k=5)
    best = load_ranker(root / "ranker").score(np.array(["u1"] * 30), np.arange(30))
    assert [i for i, _ in hits] == list(np.argsort(-best, kind="stable")[:5])


def test_a_half_written_lightgbm_ranker_is_refused(served: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = served
    shutil.copytree(root / "ranker", tmp_path / "ranker")
    (tmp_path / "ranker" / "tables.npz").unlink()
    with pytest.raises(ModelNotFound, match="tables.npz: not found"):
        load_ranker(tmp_path / "ranker")


def test_serve_lightgbm_needs_lightgbm_on() -> None:
    with pytest.raises(ValueError, match="rank.lightgbm is false"):
        RankParams(serve="lightgbm", lightgbm=False)
    assert RankParams(serve="lightgbm").serve == "lightgbm"
