"""Champion and challenger on one holdout: the evaluate stage scores the live bundle's model on this
run's test split (flows/reports/champion.py) and the gate compares the two figures. Real models on
small synthetic data; a live bundle in tmp laid out as publish lays it out (model/, schema.json)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from flows.errors import GateBlocked
from flows.params import GateParams
from flows.reports.live import bundle_eval_model, lineage
from flows.stages.evaluate import evaluate
from flows.stages.gate import gate
from models.checkpoint import load_model, save_model
from models.encoding import FeatureEncoder
from models.params import EvaluateParams, TrainParams
from models.towers import TwoTower
from models.training import tower_config
from training_data import SMALL_MODEL, run_sample_train, synthetic_training_dir

KS = EvaluateParams(ks=[10, 20], ease=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained model (the good one) and a model of the same towers with random weights."""
    root = tmp_path_factory.mktemp("champion")
    training, schema = synthetic_training_dir(root / "data", n_users=200)
    good = run_sample_train(root / "good", training, schema, seed=0,
                            train_cfg=TrainParams(epochs=6, batch_size=256, lr=0.005, threads=1, refit_full=False))
    model, encoder = load_model(good / "eval")
    torch.manual_seed(1)
    save_model(root / "random", TwoTower(model.cfg), encoder)
    return {"root": root, "training": training, "schema": schema, "good": good / "eval", "random": root / "random"}


def _publish(published: Path, model_dir: Path, schema: Path, version: str = "v1", source: str | None = None,
             served: Path | None = None) -> None:
    """The files of a live bundle that the evaluate stage reads, as publish writes them: eval_model/
    (model_dir: what its run evaluated), model/ (served; these tests train no refit: the same model
    unless given) and schema.json (the lineage)."""
    bundle = published / "versions" / version
    assert bundle_eval_model(model_dir, bundle)
    shutil.copytree(served or model_dir, bundle / "model")
    recorded = json.loads(schema.read_text())
    (bundle / "schema.json").write_text(json.dumps({**recorded, "source": source or recorded["source"]}))
    (published / "LIVE").write_text(json.dumps({"version": version}))


def _evaluate(run: dict, model_dir: Path, published: Path, reports: Path) -> dict:
    evaluate(KS, run["training"], model_dir, reports / "metrics.json", published_dir=published,
             schema_path=run["schema"], champion_path=reports / "champion.json")
    return json.loads((reports / "champion.json").read_text())


def _gate(reports: Path, cfg: GateParams = GateParams()) -> dict:
    """The gate on evaluate's real figures (the report stage's files: nothing to compare)."""
    (reports / "quality").mkdir(exist_ok=True)
    (reports / "quality" / "quality.json").write_text("{}")
    (reports / "drift").mkdir(exist_ok=True)
    (reports / "drift" / "summary.json").write_text("{}")
    summary = gate(cfg, reports / "metrics.json", reports / "quality" / "quality.json",
                   reports / "drift" / "summary.json", reports / "gate.json", Path("reports/index.html"),
                   champion_path=reports / "champion.json")
    return {**json.loads((reports / "gate.json").read_text()), "summary": summary}


def test_the_live_model_on_this_holdout_is_what_evaluating_it_gives(run: dict, tmp_path: Path):
    published = tmp_path / "published"
    _publish(published, run["good"], run["schema"])
    champion = _evaluate(run, run["random"], published, tmp_path / "challenger")
    direct = evaluate(KS, run["training"], run["good"], tmp_path / "direct" / "metrics.json")
    assert champion["compared"] and champion["live_version"] == "v1" and champion["scored"] == "eval_model"
    assert champion["metrics"] == direct["two_tower"]
    assert champion["challenger"] == json.loads((tmp_path / "challenger" / "metrics.json").read_text())["two_tower"]
    assert (champion["cold_users"], champion["cold_items"], champion["n_users"]) == (0, 0, direct["n_users"])
    assert champion["lineage"]["change"] is None
    assert champion["lineage"]["this_run"] == lineage(json.loads(run["schema"].read_text()))


def test_a_worse_challenger_is_blocked_naming_both_figures(run: dict, tmp_path: Path):
    published, reports = tmp_path / "published", tmp_path / "reports"
    _publish(published, run["good"], run["schema"])
    champion = _evaluate(run, run["random"], published, reports)
    live, mine = champion["metrics"]["ndcg@20"], champion["challenger"]["ndcg@20"]
    assert live > mine + 0.05, (live, mine)
    with pytest.raises(GateBlocked) as err:
        _gate(reports)
    noise = 2 * champion["difference_errors"]["ndcg@20"]
    assert str(err.value).startswith(f"gate: ndcg@20 {mine:.4f} vs live v1 {live:.4f} on this run's holdout: "
                                     f"fell {live - mine:.3f} > 0.010 (noise ±{noise:.3f}); see ")
    assert len(str(err.value).splitlines()) == 1
    # the paired difference's error: above 0, at most the two models' own errors summed (sd(a - b) <= sd(a) + sd(b))
    own = json.loads((reports / "metrics.json").read_text())["standard_errors"]["two_tower"]["ndcg@20"]
    direct = evaluate(KS, run["training"], run["good"], tmp_path / "direct" / "metrics.json")
    assert 0 < champion["difference_errors"]["ndcg@20"] <= own + direct["standard_errors"]["two_tower"]["ndcg@20"] + 1e-6
    assert set(champion["difference_errors"]) == set(own_figures := direct["standard_errors"]["two_tower"]), own_figures


def test_the_same_model_as_live_passes_with_no_drop(run: dict, tmp_path: Path):
    published, reports = tmp_path / "published", tmp_path / "reports"
    _publish(published, run["good"], run["schema"])
    _evaluate(run, run["good"], published, reports)
    decision = _gate(reports)
    quality = decision["checks"][0]
    assert quality["passed"] and quality["drop"] == 0 and quality["live"] == quality["current"]
    # the same model on the same users: every per-user difference is 0, and so is its error
    champion = json.loads((reports / "champion.json").read_text())
    assert champion["difference_errors"] and set(champion["difference_errors"].values()) == {0.0}
    assert quality["noise"] == 0.0
    assert decision["summary"]["quality"].endswith(" on this run's holdout (drop 0.000)")


def test_a_live_bundle_of_another_source_is_reported_and_not_compared(run: dict, tmp_path: Path):
    published, reports = tmp_path / "published", tmp_path / "reports"
    _publish(published, run["good"], run["schema"], source="/data/movielens-1m")
    champion = _evaluate(run, run["random"], published, reports)
    change = champion["lineage"]["change"]
    assert change == (f"new source: this run reads {json.loads(run['schema'].read_text())['source']}, "
                      "live v1 was trained on /data/movielens-1m")
    decision = _gate(reports)                                 # the random model is not judged against it
    assert decision["passed"] and decision["checks"][0]["skipped"].startswith(change)
    with pytest.raises(GateBlocked, match="on this run's holdout"):
        _gate(reports, GateParams(compare_across_sources=True))


def test_users_and_items_the_live_model_never_saw_are_answered_cold_and_counted(run: dict, tmp_path: Path):
    """A live model whose vocabularies hold half the catalog and half the users still scores every
    query (unknown ids map to its out-of-vocabulary row); the output says how many were cold."""
    examples = pd.read_parquet(run["training"] / "examples.parquet")
    items = pd.read_parquet(run["training"] / "items.parquet")
    known_items, known_users = items["item_id"].iloc[::2], examples["user_id"].drop_duplicates().iloc[::2]
    part = examples[examples["user_id"].isin(known_users) & examples["item_id"].isin(known_items)]
    encoder = FeatureEncoder.fit(json.loads(run["schema"].read_text()), items[items["item_id"].isin(known_items)], part)
    torch.manual_seed(0)
    save_model(tmp_path / "half", TwoTower(tower_config(encoder, SMALL_MODEL)), encoder)
    published = tmp_path / "published"
    _publish(published, tmp_path / "half", run["schema"])
    champion = _evaluate(run, run["good"], published, tmp_path / "reports")
    assert champion["compared"] and champion["cold_items"] == len(items) - len(known_items)
    queried = examples.loc[examples["split"] == "test", "user_id"].unique()
    assert 0 < champion["cold_users"] == len(set(queried) - set(known_users)) < champion["n_users"]
    assert 0 < champion["cold_targets"]


def test_a_live_model_of_another_id_space_is_not_compared(run: dict, tmp_path: Path):
    """String ids now, int ids in the live model: it cannot be scored, and the gate says so."""
    training, schema = synthetic_training_dir(tmp_path / "data", string_ids=True, n_users=60)
    challenger = run_sample_train(tmp_path / "strings", training, schema, seed=0,
                                  train_cfg=TrainParams(epochs=1, batch_size=256, threads=1, refit_full=False))
    published, reports = tmp_path / "published", tmp_path / "reports"
    source = json.loads(schema.read_text())["source"]
    _publish(published, run["good"], run["schema"], source=source)   # the same source, its ids changed type
    evaluate(KS, training, challenger, reports / "metrics.json", published_dir=published, schema_path=schema,
             champion_path=reports / "champion.json")
    champion = json.loads((reports / "champion.json").read_text())
    why = "another id space: the live model's item ids are int64, this run's are string"
    assert not champion["compared"] and champion["reason"] == why and "metrics" not in champion
    assert champion["lineage"]["change"].startswith(f"new data contract: the id types or feature columns of {source}")
    assert _gate(reports)["checks"][0]["skipped"].startswith("new data contract")
    strict = _gate(reports, GateParams(compare_across_sources=True))["checks"][0]
    assert strict["passed"] and strict["skipped"] == f"not compared: {why}"


def _random_live(run: dict, folder: Path, items: pd.DataFrame, examples: pd.DataFrame, schema: dict) -> Path:
    encoder = FeatureEncoder.fit(schema, items, examples)
    torch.manual_seed(0)
    save_model(folder, TwoTower(tower_config(encoder, SMALL_MODEL)), encoder)
    return folder


def test_a_live_model_of_other_ids_or_features_is_not_compared(run: dict, tmp_path: Path):
    examples = pd.read_parquet(run["training"] / "examples.parquet")
    items = pd.read_parquet(run["training"] / "items.parquet")
    schema = json.loads(run["schema"].read_text())
    moved = 10**6                                  # the same shapes, no id in common with this catalog
    other_ids = _random_live(run, tmp_path / "ids", items.assign(item_id=items["item_id"] + moved),
                             examples.assign(item_id=examples["item_id"] + moved), schema)
    extra = {**schema, "user_features": {**schema["user_features"],
                                         "categorical": [*schema["user_features"]["categorical"], "region"]}}
    other_features = _random_live(run, tmp_path / "features", items, examples.assign(region="north"), extra)
    for model_dir, why in ((other_ids, f"another id space: none of this run's {len(items)} items is known to "
                                       "the live model"),
                           (other_features, "another feature set: the live model reads user columns ['region'] "
                                            "that this run's data does not have")):
        published = tmp_path / f"{model_dir.name}-published"
        _publish(published, model_dir, run["schema"])
        champion = _evaluate(run, run["good"], published, tmp_path / f"{model_dir.name}-reports")
        assert not champion["compared"] and champion["reason"] == why


def test_the_served_model_is_not_scored_on_rows_it_learned(run: dict, tmp_path: Path):
    """The bundle's evaluation model is scored, not the served one (here: random weights, a refit on
    every row in a real run). A bundle without one has its served model scored only when that model's
    data ends before this holdout starts."""
    published = tmp_path / "published"
    _publish(published, run["good"], run["schema"], served=run["random"])
    champion = _evaluate(run, run["random"], published, tmp_path / "a")
    assert champion["scored"] == "eval_model" and champion["metrics"]["ndcg@20"] > champion["challenger"]["ndcg@20"]
    shutil.rmtree(published / "versions" / "v1" / "eval_model")             # a bundle published before it
    champion = _evaluate(run, run["random"], published, tmp_path / "b")
    assert not champion["compared"] and champion["scored"] == "model"
    assert champion["reason"].startswith("the live bundle v1 keeps no evaluation model, and its served model "
                                         "does not say whether it trained on this run's holdout (from ")
    shutil.rmtree(published / "versions" / "v1" / "model")
    shutil.copytree(run["good"], published / "versions" / "v1" / "model")    # trained into the holdout
    champion = _evaluate(run, run["random"], published, tmp_path / "c")
    assert not champion["compared"] and "trained on data until " in champion["reason"]
