"""Simulated ranking logs: deterministic from the seed, consistent funnel, known click model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.sources.normalize import normalize_interactions
from flows.params import SimulatorParams
from flows.sources.simulator import simulate
from datagen import make_contract_dataset

PARAMS = SimulatorParams(request_fraction=0.3, candidates=60, ranked=25, shown=10, chunk_requests=97)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, pa.ChunkedArray]:
    src = make_contract_dataset(tmp_path_factory.mktemp("sim_src"), n_users=150, n_items=120, string_ids=True)
    inter = normalize_interactions(src / "interactions.parquet", pq.read_table(src / "interactions.parquet"))
    return inter, pq.read_table(src / "items.parquet")["item_id"]


def _simulate(source: tuple[pa.Table, pa.ChunkedArray], out: Path, seed: int,
              params: SimulatorParams = PARAMS) -> tuple[dict, Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = simulate(source[0], source[1], params, seed, out / "ranking_logs.parquet", out / "simulation")
    return summary, out


@pytest.fixture(scope="module")
def run(source, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return _simulate(source, tmp_path_factory.mktemp("sim_run"), seed=3)


def test_same_seed_same_logs_other_seed_different(source, run, tmp_path: Path) -> None:
    _, first = run
    _, again = _simulate(source, tmp_path / "again", seed=3)
    _, other = _simulate(source, tmp_path / "other", seed=4)
    for name in ("ranking_logs.parquet", "simulation/truth.parquet", "simulation/user_types.parquet"):
        assert pq.read_table(first / name).equals(pq.read_table(again / name)), name
    assert (first / "simulation/truth.json").read_text() == (again / "simulation/truth.json").read_text()
    assert not pq.read_table(first / "ranking_logs.parquet").equals(pq.read_table(other / "ranking_logs.parquet"))


def test_funnel_is_consistent(source, run) -> None:
    summary, out = run
    logs = pd.read_parquet(out / "ranking_logs.parquet")
    n_inter = source[0].num_rows
    assert summary["requests"] == round(PARAMS.request_fraction * n_inter) == logs["request_id"].nunique()
    assert summary["log_rows"] == len(logs)
    assert not logs.duplicated(["request_id", "item_id"]).any()
    assert set(logs["stage"]) == {"retrieved", "ranked", "shown"}
    per_request = logs.groupby("request_id")
    assert per_request.size().max() <= PARAMS.candidates
    assert (per_request["user_id"].nunique() == 1).all() and (per_request["timestamp"].nunique() == 1).all()
    shown = logs[logs["stage"] == "shown"]
    assert logs.loc[logs["stage"] != "shown", "position"].isna().all()
    assert (shown.groupby("request_id")["position"].apply(sorted)
            .apply(lambda p: p == list(range(1, len(p) + 1)))).all()
    assert (shown.groupby("request_id").size() == PARAMS.shown).all()
    assert ((logs["stage"] != "retrieved").groupby(logs["request_id"]).sum() == PARAMS.ranked).all()
    # Stages follow the ranker's score: every shown item outscores every ranked one, which outscore
    # every merely retrieved one.
    best = logs.groupby(["request_id", "stage"])["ranker_score"].agg(["min", "max"]).unstack("stage")
    assert (best[("min", "shown")] >= best[("max", "ranked")]).all()
    assert (best[("min", "ranked")] >= best[("max", "retrieved")]).all()
    # Position 1 has the highest score of the request.
    top = shown[shown["position"] == 1].set_index("request_id")["ranker_score"]
    assert np.allclose(top.sort_index(), per_request["ranker_score"].max().sort_index())
    assert not logs.loc[logs["stage"] != "shown", "clicked"].any()
    assert logs["clicked"].any()


def test_the_interacted_item_is_retrieved_and_relevant(source, run) -> None:
    _, out = run
    logs = pd.read_parquet(out / "ranking_logs.parquet")
    inter = source[0].to_pandas()[["user_id", "item_id", "timestamp"]].drop_duplicates()
    hit = logs.merge(inter, on=["user_id", "item_id", "timestamp"])
    assert hit["request_id"].nunique() == logs["request_id"].nunique()
    truth = pd.read_parquet(out / "simulation/truth.parquet")
    shown_hits = truth.merge(hit[["request_id", "item_id"]], on=["request_id", "item_id"])
    assert shown_hits["p_relevant"].median() > truth["p_relevant"].median()
    assert shown_hits["p_relevant"].median() > 0.7


def test_truth_matches_logs_and_click_model(run) -> None:
    _, out = run
    truth_json = json.loads((out / "simulation/truth.json").read_text())
    prop = {k: np.array(v) for k, v in truth_json["propensity"].items()}
    for curve in prop.values():
        assert len(curve) == PARAMS.shown and (np.diff(curve) < 0).all()
    assert (prop["impatient"][2:] < prop["patient"][2:]).all()
    assert prop["impatient"][4] < 0.1 < prop["patient"][-1]  # impatient users stop after the top ~3
    logs = pd.read_parquet(out / "ranking_logs.parquet")
    shown = logs[logs["stage"] == "shown"]
    truth = pd.read_parquet(out / "simulation/truth.parquet")
    assert len(truth) == len(shown)
    rows = truth.merge(shown, on=["request_id", "item_id"], validate="one_to_one")
    types = pd.read_parquet(out / "simulation/user_types.parquet").set_index("user_id")["user_type"]
    assert (rows["user_type"] == rows["user_id"].map(types)).all()
    expected = [prop[t][p - 1] for t, p in zip(rows["user_type"], rows["position"])]
    assert np.allclose(rows["p_examine"], expected)
    assert rows["p_relevant"].between(0, 1).all()
    assert 0.2 < truth_json["mixture"]["impatient"] < 0.8
    # Clicks follow the model: impatient users click less than patient ones deep in the list.
    deep = rows[rows["position"] >= 4].groupby("user_type")["clicked"].mean()
    assert deep["impatient"] < deep["patient"]


def test_empty_interactions_write_empty_logs(source, tmp_path: Path) -> None:
    summary, out = _simulate((source[0].slice(0, 0), source[1]), tmp_path, seed=1)
    assert summary["requests"] == 0
    logs = pq.read_table(out / "ranking_logs.parquet")
    assert logs.num_rows == 0 and logs.schema.field("user_id").type == pa.string()
    assert pq.read_table(out / "simulation/truth.parquet").num_rows == 0


# --- effects for measuring rankers (position bias η, logging strength, neighbours, grid) -------------

def _frames(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    logs = pd.read_parquet(out / "ranking_logs.parquet")
    truth = pd.read_parquet(out / "simulation/truth.parquet")
    shown = logs[logs["stage"] == "shown"].merge(truth, on=["request_id", "item_id"])
    return logs, shown


def test_position_bias_eta_sets_the_propensity_curves(source, tmp_path: Path) -> None:
    params = PARAMS.model_copy(update={"position_bias": 2.0, "impatient_bias_factor": 2.0})
    _, out = _simulate(source, tmp_path, seed=3, params=params)
    _, shown = _frames(out)
    pos = shown["position"].astype(float)
    eta = np.where(shown["user_type"] == "patient", 2.0, 4.0)
    np.testing.assert_allclose(shown["p_examine_position"], 0.95 * pos ** -eta)
    np.testing.assert_allclose(shown["p_examine"], shown["p_examine_position"])   # no neighbour effect
    truth = json.loads((out / "simulation/truth.json").read_text())
    np.testing.assert_allclose(truth["propensity"]["patient"], 0.95 * np.arange(1, 11) ** -2.0)


def _rank_correlation(shown: pd.DataFrame) -> float:
    """Mean per-request Spearman correlation of -position with true relevance."""
    corr = shown.groupby("request_id").apply(
        lambda g: g["p_relevant"].rank().corr((-g["position"]).rank()) if len(g) > 2 else np.nan,
        include_groups=False)
    return float(corr.mean())


def test_logging_strength_runs_from_random_to_perfect(source, tmp_path: Path) -> None:
    perfect = _frames(_simulate(source, tmp_path / "s1", 3, PARAMS.model_copy(update={"logging_strength": 1.0}))[1])[1]
    random_ = _frames(_simulate(source, tmp_path / "s0", 3, PARAMS.model_copy(update={"logging_strength": 0.0}))[1])[1]
    assert _rank_correlation(perfect) > 0.99
    assert abs(_rank_correlation(random_)) < 0.1


def test_neighbour_effect_lowers_examination_next_to_relevant_items(source, tmp_path: Path) -> None:
    params = PARAMS.model_copy(update={"neighbour_effect": 0.5})
    _, out = _simulate(source, tmp_path, seed=3, params=params)
    _, shown = _frames(out)
    one = shown[shown["request_id"] == shown["request_id"].iloc[0]].sort_values("position")
    rel = one["p_relevant"].to_numpy()
    for i in range(len(one)):
        nb = [rel[j] for j in (i - 1, i + 1) if 0 <= j < len(rel)]
        expected = one["p_examine_position"].iloc[i] * (1 - 0.5 * np.mean(nb))
        assert one["p_examine"].iloc[i] == pytest.approx(expected)
    assert (shown["p_examine"] < shown["p_examine_position"]).all()


def test_grid_layout_writes_rows_and_columns_and_uses_grid_neighbours(source, tmp_path: Path) -> None:
    params = PARAMS.model_copy(update={"grid_columns": 5, "neighbour_effect": 0.5})
    _, out = _simulate(source, tmp_path, seed=3, params=params)
    logs, shown = _frames(out)
    assert logs.loc[logs["stage"] != "shown", ["grid_row", "grid_col"]].isna().all().all()
    np.testing.assert_array_equal(shown["grid_row"], (shown["position"] - 1) // 5 + 1)
    np.testing.assert_array_equal(shown["grid_col"], (shown["position"] - 1) % 5 + 1)
    one = shown[shown["request_id"] == shown["request_id"].iloc[0]].set_index(["grid_row", "grid_col"])
    rel = one["p_relevant"]
    r, c = 1, 2                                   # top row: left, right and below are its neighbours
    nb = [rel[k] for k in ((1, 1), (1, 3), (2, 2)) if k in rel.index]
    assert one.loc[(r, c), "p_examine"] == pytest.approx(one.loc[(r, c), "p_examine_position"] * (1 - 0.5 * np.mean(nb)))


def _logs(source, out: Path, **update) -> pd.DataFrame:
    params = PARAMS.model_copy(update={"logging_strength": 0.0, "chunk_requests": 10_000, **update})
    return pd.read_parquet(_simulate(source, out, 3, params)[1] / "ranking_logs.parquet")


def test_the_logger_repeats_its_errors_unless_they_are_redrawn(source, tmp_path: Path) -> None:
    """A random logger (strength 0) whose error is persistent scores an item the same in every request
    (per item) or a (user, item) pair the same (user_item); redrawn, the same item scores differently."""
    spread = {}
    for mode, keys in (("item", ["item_id"]), ("user_item", ["user_id", "item_id"])):
        for redraw in (0.0, 1.0):
            logs = _logs(source, tmp_path / f"{mode}{redraw}", logger_error=mode, logger_error_redraw=redraw)
            repeated = logs.groupby(keys)["ranker_score"].filter(lambda s: len(s) > 1)
            spread[mode, redraw] = logs.loc[repeated.index].groupby(keys)["ranker_score"].std().max()
    assert spread["item", 0.0] < 1e-9 and spread["user_item", 0.0] < 1e-9
    assert spread["item", 1.0] > 0.1 and spread["user_item", 1.0] > 0.1
    # user_item errors are not item errors: the same item scores differently for different users
    per_item = _logs(source, tmp_path / "ui", logger_error="user_item").groupby("item_id")["ranker_score"].std()
    assert per_item.max() > 0.1


def test_fully_redrawn_errors_leave_the_persistent_draw_out(source, tmp_path: Path) -> None:
    """logger_error_redraw 1 is the old world: which persistent error model is configured changes nothing,
    and a persistent logger's world differs only in the logger's order (relevance and user types stay)."""
    a = _logs(source, tmp_path / "a", logger_error="item", logger_error_redraw=1.0)
    b = _logs(source, tmp_path / "b", logger_error="user_item", logger_error_redraw=1.0)
    pd.testing.assert_frame_equal(a, b)
    c = _logs(source, tmp_path / "c", logger_error="item", logger_error_redraw=0.0)
    assert not np.allclose(a["ranker_score"], c["ranker_score"])
    assert (a["request_id"] == c["request_id"]).all() and (a["user_id"] == c["user_id"]).all()
    truth = json.loads((tmp_path / "c/simulation/truth.json").read_text())
    assert "persistent (item), r = 0" in truth["logging_ranker"]["error"]
