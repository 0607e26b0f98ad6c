"""A report never fails the run because one figure cannot be computed on the data at hand: each
Evidently metric that raises is shown as not computed with its reason (quality.json, quality.html,
the portal), the gate records it and still decides. Shapes: a catalog where every item was seen once,
constant feature columns, a holdout of one user. Default params."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.params import Params, load_params
from flows.portal.build import PortalInputs, build_portal
from flows.reports.quality import quality_report
from flows.stages.gate import gate
from flows.stages.report import report
from shapes import SCHEMA, SHAPES, StageInputs, make_shape, stage_inputs

ROOT = Path(__file__).resolve().parents[2]
K = 20


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DO_NOT_TRACK", "1")


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params(ROOT / "params.yaml")


def _run(p: Params, s: StageInputs, root: Path) -> tuple[dict, dict, dict]:
    """report + gate; returns (quality.json, drift summary, gate.json)."""
    report(p.report, p.gate.max_drift_share, p.base.seed, s.ingested, s.training, s.recs, root / "published",
           s.reports / "drift", s.reports / "quality")
    gate(p.gate, s.reports / "metrics.json", s.reports / "quality" / "quality.json",
         s.reports / "drift" / "summary.json", s.reports / "gate.json", Path("reports/index.html"),
             s.reports / "champion.json")
    return tuple(json.loads(path.read_text()) for path in (
        s.reports / "quality" / "quality.json", s.reports / "drift" / "summary.json", s.reports / "gate.json"))


def _seen_once(n_users: int = 11, per_user: int = 40) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Every item rated by exactly one user (each user has their own items)."""
    users, _, _ = make_shape(dataclasses.replace(SHAPES["weekly_season"], rows=10, users=n_users))
    items = pd.DataFrame({"item_id": np.arange(n_users * per_user) + 10_001, "genre": "drama",
                          "year": np.linspace(1990, 2020, n_users * per_user)})
    start = pd.Timestamp("2024-01-01", tz="UTC")
    inter = pd.DataFrame({"user_id": np.repeat(users["user_id"].to_numpy(), per_user), "item_id": items["item_id"],
                          "timestamp": [start + pd.Timedelta(hours=h) for h in range(n_users * per_user)],
                          "rating": 4.0})
    return users, items, inter


def test_a_catalog_seen_once_leaves_novelty_not_computed_and_the_rest_stands(params: Params, tmp_path: Path):
    """Users' top K mix items seen once in training with ones never trained on, in different counts:
    each user's mean inverse frequency is the same number up to the last bit, and Evidently's
    histogram of them raises ValueError (the failure that stopped a run). The other figures, the
    page, the gate and the portal carry on."""
    users, items, inter = _seen_once()
    s = stage_inputs(tmp_path, users, items, inter)
    examples = pd.read_parquet(s.training / "examples.parquet")
    trained = examples.loc[examples["split"] == "train", "item_id"].to_numpy()
    held = examples[examples["split"] == "test"]
    rows = []
    for n, (user, own) in enumerate(held.groupby("user_id")["item_id"]):
        top = list(trained[n * 7:n * 7 + 10 + n]) + list(held.loc[held["user_id"] != user, "item_id"][:K])
        top = top[:K]
        rows += [(user, item, float(K - r), int(item in set(own))) for r, item in enumerate(top)]
        rows += [(user, item, -1.0, 1) for item in own if item not in top]
    pd.DataFrame(rows, columns=["user_id", "item_id", "score", "target"]).to_parquet(s.recs, index=False)

    quality, drift, decision = _run(params, s, tmp_path)
    # these top lists hold no user's own held-out item: serendipity (over the hits) has nothing to measure
    assert set(quality["not_computed"]) == {f"novelty@{K}", f"serendipity@{K}"}
    assert quality["not_computed"][f"novelty@{K}"].startswith("ValueError: Too many bins for data range")
    assert {f"ndcg@{K}", f"recall@{K}", f"personalization@{K}", f"popularity_gini@{K}"} <= set(quality)
    assert f"novelty@{K}" not in quality
    assert f"not computed: ValueError" in (s.reports / "quality" / "quality.html").read_text()
    # 440 rows: too few for windows; said with the row count, and never drifted
    assert drift["window"]["rows"] == 440 and drift["window"]["skipped"].startswith("not judged: 440 rows")
    assert decision["passed"] and decision["missing_inputs"][0].startswith(f"quality.json: novelty@{K} not computed")
    page = build_portal(s.reports, PortalInputs()).read_text()
    assert f"Model quality: novelty@{K} not computed: ValueError: Too many bins" in page


def test_constant_feature_columns_are_named_not_compared(params: Params, tmp_path: Path):
    users, items, inter = make_shape(dataclasses.replace(SHAPES["weekly_season"], rows=8_000, users=400, items=600))
    s = stage_inputs(tmp_path, users.assign(gender="F"), items.assign(year=2000.0, genre="drama"),
                     inter.assign(rating=3.0))
    quality, drift, decision = _run(params, s, tmp_path)
    window = drift["window"]
    assert {"user_gender", "item_year", "item_genre", "rating"} <= set(window["constant_or_one_sided"])
    assert not {"user_gender", "item_year", "item_genre", "rating"} & set(window["columns"])
    assert window["n_drifted"] == 0 and decision["passed"] and f"ndcg@{K}" in quality
    # all-zero item vectors leave no distance to measure: skipped or not computed, never a failure
    assert f"diversity@{K}" in quality or f"diversity@{K}" in quality.get("not_computed", {}) or "note" in quality


def test_a_one_user_holdout_still_reports(params: Params, tmp_path: Path):
    users, items, inter = make_shape(dataclasses.replace(SHAPES["weekly_season"], rows=3_000, users=200, items=400))
    s = stage_inputs(tmp_path, users, items, inter)
    recs = pd.read_parquet(s.recs)
    recs[recs["user_id"] == recs["user_id"].iloc[0]].to_parquet(s.recs, index=False)
    quality, drift, decision = _run(params, s, tmp_path)
    assert quality["users"] == 1 and f"ndcg@{K}" in quality and decision["passed"]
    computed_or_named = set(quality) | set(quality.get("not_computed", {}))
    assert {f"personalization@{K}", f"novelty@{K}", f"score_entropy@{K}"} <= computed_or_named


def test_a_model_that_finds_nothing_reports_zeros_in_strict_json(params: Params, tmp_path: Path,
                                                                 recwarn: pytest.WarningsRecorder):
    """No held-out item in any top K (a model with NDCG 0): Evidently's F-beta divides 0 by 0 and its
    Serendipity averages over no hit. F is 0 (as where precision and recall are both 0) and
    Serendipity not computed, without a NaN in quality.json (not JSON to a strict reader) or a numpy
    RuntimeWarning in the run's log."""
    users, items, inter = make_shape(dataclasses.replace(SHAPES["weekly_season"], rows=3_000, users=200, items=400))
    s = stage_inputs(tmp_path, users, items, inter)
    recs = pd.read_parquet(s.recs)
    in_top = recs["rank"].notna()
    recs.loc[in_top, "target"] = 0          # what the model found is no longer held out: it found nothing
    assert (recs.loc[~in_top, "target"] == 1).any()
    recs.to_parquet(s.recs, index=False)
    quality, _, decision = _run(params, s, tmp_path)

    def strict(constant: str) -> None:
        raise AssertionError(f"quality.json holds {constant}")
    json.loads((s.reports / "quality" / "quality.json").read_text(), parse_constant=strict)
    assert quality[f"f1@{K}"] == 0.0 and quality[f"ndcg@{K}"] == 0.0 and quality[f"recall@{K}"] == 0.0
    # serendipity is measured over the hits: none here, so not computed, with the reason
    assert quality["not_computed"][f"serendipity@{K}"].startswith(f"not defined on this data (Evidently gave nan): "
                                                                  f"no held-out item in any top {K}")
    assert decision["passed"]
    # the stage runs the report in a forked worker, whose warnings a test cannot see: the same report
    # in this process, where recwarn records them
    train = pd.read_parquet(s.training / "examples.parquet")
    ids = pd.concat([recs["item_id"], train["item_id"]]).unique()
    vectors = pd.DataFrame({"item_id": ids, "f0": np.random.default_rng(0).normal(size=len(ids))})
    figures, not_computed = quality_report(recs, train, vectors, K, tmp_path / "again.html")
    assert figures[f"f1@{K}"] == 0.0 and f"serendipity@{K}" in not_computed and f"diversity@{K}" in figures
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]
