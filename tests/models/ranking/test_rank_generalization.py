"""New items and users are scored from their features (issue 22): ids absent from training are zeroed
to OOV, ids are dropped out in training, a catalog of rarely shown items is ranked by features alone,
numeric features are scaled robustly, and NDCG is reported apart for seen and unseen items."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tests.models.ranking.rank_simulator import SimConfig, Split, hold_out_items, read_split, simulate

from models.ranking import evaluate
from models.ranking.catalog import Vocab, _scaled, quantile_knots, quantile_normal
from models.ranking.params import RankParams
from models.ranking.seen import Seen, seen_in, split_ndcg
from models.ranking.config import RankerConfig
from models.ranking.train import build_model, fit, validation_loss

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Split, Split, Seen]:
    """3,000 items described by noisy features, each shown ~10 times in training, 30% of them only in
    held-out requests (new items): read once with item ids and once features-only."""
    sim = simulate(SimConfig(n_items=3000, requests=3000, etas=(1.0, 1.0), seed=1))
    hold_out_items(sim, 0.3, RankParams().test_fraction)
    ids = read_split(sim, tmp_path_factory.mktemp("ids"), RankParams(epochs=5, features_only=False))
    feats = read_split(sim, tmp_path_factory.mktemp("feats"), RankParams(epochs=5, features_only=True))
    return ids, feats, seen_in(ids.train, len(ids.features.users), len(ids.features.items))


def _fitted(split: Split, seen: Seen, params: RankParams):
    model = build_model("pal", split.config, split.features, seed=0)
    model.relevance.forget(seen.users, seen.items)
    fit(model, split.train, params, seed=0)
    return model


def test_a_rarely_shown_catalog_is_ranked_better_from_features_alone(wide: tuple[Split, Split, Seen]) -> None:
    ids, feats, seen = wide
    assert ids.config.ids and not feats.config.ids
    assert not seen.ids_worth_learning(has_item_features=True)              # what features_only: auto picks
    with_ids = _fitted(ids, seen, RankParams(epochs=5))
    features = _fitted(feats, seen, RankParams(epochs=5))
    ndcg = {n: evaluate.relevance_ndcg(m, ids.test) for n, m in (("ids", with_ids), ("features", features))}
    split = {n: split_ndcg(m, ids.test, seen) for n, m in (("ids", with_ids), ("features", features))}
    print(ndcg, split)
    # ids memorize ~10 clicks per item; the features carry relevance (0.877 vs 0.937 when measured)
    assert ndcg["features"] > ndcg["ids"] + 0.03
    assert split["features"]["items_seen"]["ndcg@10"] > split["ids"]["items_seen"]["ndcg@10"] + 0.02
    assert split["features"]["items_unseen"]["ndcg@10"] >= split["ids"]["items_unseen"]["ndcg@10"] - 0.01
    assert split["ids"]["items_unseen"]["requests"] > 100 and split["ids"]["users_unseen"]["requests"] == 0


def test_ids_absent_from_training_score_like_an_unknown_id(wide: tuple[Split, Split, Seen]) -> None:
    ids, _, seen = wide
    model = build_model("pal", ids.config, ids.features, seed=0)
    new = np.flatnonzero(~seen.items)[1:]                                    # never shown in training
    assert len(new) > 500
    before = model.relevance.item_emb.weight[torch.from_numpy(new)]
    assert before.abs().sum() > 0                                            # random initial vectors
    model.relevance.forget(seen.users, seen.items)
    assert model.relevance.item_emb.weight[torch.from_numpy(new)].abs().sum() == 0
    assert model.relevance.item_emb.weight[torch.from_numpy(np.flatnonzero(seen.items))].abs().sum() > 0


def test_id_dropout_hides_ids_in_training_only(wide: tuple[Split, Split, Seen]) -> None:
    ids, _, _ = wide
    cfg = RankerConfig(**{**ids.config.to_dict(), "id_dropout": 0.5})
    tower = build_model("naive", cfg, ids.features, seed=0).relevance
    batch = ids.train[0]
    tower.train()
    torch.manual_seed(0)
    a = tower.inputs(batch.user, batch.item, None)
    b = tower.inputs(batch.user, batch.item, None)
    assert not torch.equal(a, b)                                             # a different half dropped
    tower.eval()
    assert torch.equal(tower.inputs(batch.user, batch.item, None), tower.inputs(batch.user, batch.item, None))


def test_auto_learns_ids_only_when_items_repeat_and_have_features() -> None:
    seen = np.array([False, True, True, True])
    rare = Seen(np.ones(3, bool), seen, np.array([0, 1, 12, 29]))
    often = Seen(np.ones(3, bool), seen, np.array([0, 50, 80, 3]))
    assert not rare.ids_worth_learning(has_item_features=True)
    assert rare.ids_worth_learning(has_item_features=False)               # ids are all there is
    assert often.ids_worth_learning(has_item_features=True)


def test_quantile_scaling_keeps_a_heavy_tailed_feature_spread() -> None:
    rng = np.random.default_rng(0)
    raw = np.exp(rng.normal(0, 2, 500))
    raw[0] = 1e12                                                            # one outlier
    raw[1] = np.nan
    table = pd.DataFrame({"item_id": np.arange(500), "bm25": raw})
    items = Vocab(np.arange(500))
    quantile, names, fitted = _scaled(table, items, "quantile")
    standard, _, _ = _scaled(table, items, "standard")
    assert names == ["bm25"] and fitted["method"] == "quantile" and len(fitted["knots"]["bm25"]) > 100
    q, s = quantile[items.lookup(np.arange(2, 500)), 0], standard[items.lookup(np.arange(2, 500)), 0]
    assert 0.8 < q.std() < 1.2 and abs(q.mean()) < 0.1                      # a standard normal's spread
    assert s.std() < 0.01                                                    # the outlier squashed the rest
    order = np.argsort(raw[2:])
    assert (np.diff(q[order]) >= 0).all()                                    # the order is kept
    assert quantile[items.lookup(np.array([1])), 0] == 0                     # missing: the median
    knots = quantile_knots(np.array([0.0, 0.0, 0.0, 1.0]))                  # a binary feature stays two values
    assert quantile_normal(np.array([0.0]), knots)[0] < 0 < quantile_normal(np.array([1.0]), knots)[0]


def test_early_stopping_keeps_the_best_epoch_on_held_out_requests(tmp_path: Path) -> None:
    params = RankParams(epochs=30, lr=0.05, patience=2)
    split = read_split(simulate(SimConfig(n_users=40, n_items=60, requests=300, seed=3)), tmp_path, params)
    model = build_model("pal", split.config, split.features, seed=0)
    report = fit(model, split.train, params, seed=0, valid=split.test)
    print(report.best_epoch, report.epochs, np.round(report.valid_losses, 4))
    assert report.epochs < 30 and report.epochs == report.best_epoch + 2          # stopped by patience
    assert len(report.valid_losses) == report.epochs
    assert validation_loss(model, split.test) == pytest.approx(min(report.valid_losses))   # best weights back
    assert not model.training


def test_early_stopping_without_validation_requests_trains_every_epoch(tmp_path: Path) -> None:
    """Few users held out can leave validation empty: training must not stop for lack of a figure."""
    params = RankParams(epochs=3, patience=1)
    split = read_split(simulate(SimConfig(n_users=40, n_items=60, requests=150, seed=3)), tmp_path, params)
    report = fit(build_model("pal", split.config, split.features, seed=0), split.train, params, seed=0, valid=[])
    assert report.epochs == 3 and report.best_epoch is None
