"""evaluate stage after train on synthetic taste-group data: the model beats most popular, same seed
gives the same metrics, string ids, missing model; and the inference bundle it loads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.errors import MissingStageInput
from flows.stages.evaluate import evaluate
from models.inference import load_bundle
from models.params import EvaluateParams, ModelParams, TrainParams
from training_data import SMALL_MODEL, run_sample_train, synthetic_training_dir

KS = EvaluateParams(ks=[10, 20])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """600 users (the taste groups need a few hundred users to be learnable beyond popularity)."""
    root = tmp_path_factory.mktemp("eval")
    training, schema = synthetic_training_dir(root, n_users=600)
    train_cfg = TrainParams(epochs=8, batch_size=256, lr=0.005, threads=1, refit_full=False)
    model_dir = run_sample_train(root, training, schema, seed=0, train_cfg=train_cfg)
    return root, training, model_dir


def test_two_tower_beats_most_popular(trained):
    root, training, model_dir = trained
    out = root / "reports" / "metrics.json"
    result = evaluate(KS, training, model_dir, out)
    assert json.loads(out.read_text()) == result
    cold = ("cold_recall",) if result["n_cold_held_out"] else ()
    names = {f"{m}@{k}" for k in (10, 20) for m in ("recall", "ndcg", "hitrate", "coverage", "tail_recall", *cold)}
    assert set(result["two_tower"]) == set(result["most_popular"]) == set(result["ease"]) == names
    # every figure averaged over users has its standard error (what the gate's baselines check reads)
    errors = result["standard_errors"]
    assert set(errors) == {"two_tower", "most_popular", "ease"}
    for model, figures in errors.items():
        assert set(figures) == {n for n in names if not n.startswith("coverage")}, model
        assert 0 < figures["ndcg@20"] < 0.5 / np.sqrt(result["n_users"]), model   # values in [0, 1]: sd <= 0.5
    examples = pd.read_parquet(training / "examples.parquet")
    assert result["n_users"] == examples.loc[examples["split"] == "test", "user_id"].nunique()
    assert result["n_items"] == 150 and result["n_tail_items"] == 120
    tt, mp, ease = result["two_tower"], result["most_popular"], result["ease"]
    for m in ("recall@20", "ndcg@20", "ndcg@10"):
        assert tt[m] > mp[m] + 0.04, (m, tt[m], mp[m])
        assert ease[m] > mp[m], (m, ease[m], mp[m])
    assert 0 < mp["recall@10"] < mp["recall@20"] <= 1
    assert mp["recall@20"] <= mp["hitrate@20"] <= 1
    # most popular recommends the same 20 items to everyone (minus what they have seen)
    assert mp["coverage@20"] < tt["coverage@20"]
    assert result["ease_lambda"] in KS.ease_lambdas
    assert set(result["ease_validation"]["by_lambda"]) == {f"{lam:g}" for lam in KS.ease_lambdas}


def test_same_seed_gives_identical_metrics(tmp_path):
    training, schema = synthetic_training_dir(tmp_path / "data", n_users=120)
    train_cfg = TrainParams(epochs=2, batch_size=128, threads=1, refit_full=False)
    runs = []
    for name in ("a", "b"):
        model_dir = run_sample_train(tmp_path / name, training, schema, seed=5, train_cfg=train_cfg)
        runs.append(evaluate(KS, training, model_dir, tmp_path / name / "metrics.json"))
    assert runs[0] == runs[1]
    other = run_sample_train(tmp_path / "c", training, schema, seed=6, train_cfg=train_cfg)
    assert evaluate(KS, training, other, tmp_path / "c" / "metrics.json") != runs[0]


def test_bundle_encodes_unknown_users_and_items(trained):
    _, training, model_dir = trained
    bundle = load_bundle(model_dir / "eval")
    assert bundle.dim == SMALL_MODEL.dim
    items = pd.read_parquet(training / "items.parquet")
    item_vecs = bundle.encode_items(items)
    assert item_vecs.shape == (len(items), bundle.dim) and item_vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(item_vecs, axis=1), 1.0, rtol=1e-5)

    users = pd.DataFrame({
        "user_id": [10**9, 1],
        "age_bucket": ["never-seen", "25-34"],
        "gender": [None, "F"],
        "occupation": ["occ00", "occ11"],
        "recent_items": [[], [int(items["item_id"].iloc[0]), 987654321]],
    })
    user_vecs = bundle.encode_users(users)
    assert user_vecs.shape == (2, bundle.dim) and np.isfinite(user_vecs).all()
    np.testing.assert_allclose(np.linalg.norm(user_vecs, axis=1), 1.0, rtol=1e-5)
    only_ids = bundle.encode_users(pd.DataFrame({"user_id": [10**9]}))  # no features, no history column
    assert only_ids.shape == (1, bundle.dim)
    new_item = bundle.encode_items(pd.DataFrame({"item_id": [-1], "genres": [["comedy"]], "year": [1990]}))
    assert np.isfinite(new_item).all()


def test_string_ids_train_and_evaluate(tmp_path):
    training, schema = synthetic_training_dir(tmp_path / "data", n_users=60, string_ids=True)
    train_cfg = TrainParams(epochs=1, batch_size=128, threads=1)
    model_dir = run_sample_train(tmp_path, training, schema, seed=0, train_cfg=train_cfg,
                                 model_cfg=ModelParams(dim=8, embedding_dim=8, hidden=[8], user_id_embedding=True))
    result = evaluate(KS, training, model_dir, tmp_path / "metrics.json")
    assert result["n_users"] > 0 and 0 <= result["two_tower"]["recall@20"] <= 1
    bundle = load_bundle(model_dir / "full")
    vecs = bundle.encode_users(pd.DataFrame({"user_id": ["u9999"], "recent_items": [["i0001"]]}))
    assert vecs.shape == (1, 8)


def test_evaluate_reports_a_missing_model(trained, tmp_path):
    _, training, _ = trained
    with pytest.raises(MissingStageInput, match="model.pt"):
        evaluate(KS, training, tmp_path / "no-model", tmp_path / "metrics.json")


def test_the_queries_get_their_own_history_lists_read_for_their_rows_alone(tmp_path):
    """evaluate reads examples.parquet without the history lists (at 10M they were most of its 7.2 GB)
    and reads back the lists of the queried rows only: the queries are the ones a whole read gives,
    lists included, in the same order, across read batches and with sampled users."""
    from flows.stages.evaluate import ROW, _read_training, _test_task, _with_history
    from models.holdout import catalog_task, sample_queries
    rng = np.random.default_rng(5)
    n = 3_000
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(200)]})
    examples = pd.DataFrame({
        "user_id": rng.choice([f"u{j}" for j in range(400)], n),
        "item_id": rng.choice(items["item_id"], n),
        "timestamp": pd.to_datetime(rng.integers(0, 10**6, n), unit="s", utc=True),
        "split": rng.choice(["train", "test"], n, p=[0.7, 0.3]),
        "recent_items": [list(rng.choice(items["item_id"], rng.integers(0, 6))) for _ in range(n)],
    })
    (tmp_path / "training").mkdir()
    examples.to_parquet(tmp_path / "training" / "examples.parquet", row_group_size=700)
    items.to_parquet(tmp_path / "training" / "items.parquet")
    source = tmp_path / "training" / "examples.parquet"
    whole = sample_queries(catalog_task(pd.read_parquet(source), items), 150).queries
    light, light_items = _read_training(tmp_path / "training")
    assert "recent_items" not in light.columns
    queries = _with_history(sample_queries(_test_task(light, light_items, source), 150), source,
                            batch_rows=333).queries
    assert ROW not in queries.columns and len(queries) == 150
    pd.testing.assert_frame_equal(queries[whole.columns], whole)
