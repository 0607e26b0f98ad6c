"""The report stage on small data: a real two-tower trained for 2 epochs, its holdout recommendations
from the evaluate stage, real Evidently quality and drift reports, and a live bundle in tmp built
from a first run's files the way publish builds it."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.errors import MissingStageInput
from flows.params import DriftLimits, ReportParams
from flows.reports.live import bundle_eval_model, bundle_reports
from flows.stages.evaluate import evaluate
from flows.stages.report import report
from models.holdout import catalog_task
from models.params import EvaluateParams, TrainParams
from training_data import run_sample_train, synthetic_training_dir

K = 10
CFG = ReportParams(k=K, drift_rows=5000)
FIGURES = {f"{name}@{K}" for name in (
    "precision", "recall", "f1", "map", "ndcg", "mrr", "hitrate", "score_entropy", "personalization",
    "novelty", "diversity", "serendipity", "popularity_arp", "popularity_gini", "popularity_coverage")}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DO_NOT_TRACK", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ingested/ (schema.json + interactions with ratings), training/, reports/{metrics.json,
    quality/recs.parquet} from a tiny trained model."""
    root = tmp_path_factory.mktemp("report")
    training, schema = synthetic_training_dir(root / "data", n_users=150)
    ingested = root / "ingested"
    ingested.mkdir()
    shutil.copy(schema, ingested / "schema.json")
    shutil.copy(root / "data" / "source" / "interactions.parquet", ingested / "interactions.parquet")
    model = run_sample_train(root, training, schema, seed=0,
                             train_cfg=TrainParams(epochs=2, batch_size=256, threads=1, refit_full=False))
    reports = root / "reports"
    evaluate(EvaluateParams(ks=[K, 20], ease=False), training, model, reports / "metrics.json",
             recs_path=reports / "quality" / "recs.parquet")
    return {"root": root, "ingested": ingested, "training": training, "reports": reports, "model": model}


def _report(run: dict, reports: Path, published: Path, cfg: ReportParams = CFG, training: Path | None = None,
            strict: bool = False) -> dict:
    """The report stage, after the evaluate stage scored what `published` holds on this holdout."""
    evaluate(EvaluateParams(ks=[K, 20], ease=False), run["training"], run["model"], reports / "metrics.json",
             published_dir=published, schema_path=run["ingested"] / "schema.json",
             champion_path=reports / "champion.json")
    return report(cfg, DriftLimits(), 0, run["ingested"], training or run["training"],
                  run["reports"] / "quality" / "recs.parquet", published, reports / "drift", reports / "quality",
                  champion_path=reports / "champion.json", compare_across_sources=strict)


def _publish_first(run: dict, first: Path, published: Path, source: str | None = None) -> None:
    """This run's files and model as publish keeps them in versions/v1 (its schema.json: `source`)."""
    (first / "gate.json").write_text(json.dumps({"passed": True}))
    bundle = published / "versions" / "v1"
    bundle_reports(first, bundle)
    shutil.copytree(run["model"] / "eval", bundle / "model")
    assert bundle_eval_model(run["model"] / "eval", bundle)
    schema = json.loads((run["ingested"] / "schema.json").read_text())
    (bundle / "schema.json").write_text(json.dumps({**schema, "source": source or schema["source"]}))
    (published / "LIVE").write_text(json.dumps({"version": "v1"}))


def test_holdout_recommendations_rank_like_the_metrics(run: dict):
    recs = pd.read_parquet(run["reports"] / "quality" / "recs.parquet")
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score", "target"]
    examples = pd.read_parquet(run["training"] / "examples.parquet")
    task = catalog_task(examples, pd.read_parquet(run["training"] / "items.parquet"))
    ranked = recs.dropna(subset=["rank"])
    assert ranked.groupby("user_id")["rank"].agg(list).map(lambda r: r == list(range(1, 21))).all()
    assert recs["user_id"].nunique() == task.n_users and int(recs["target"].sum()) == len(task.relevant[0])
    # held-out items outside the top 20 score at most the user's 20th score
    cut = ranked.groupby("user_id")["score"].min()
    missed = recs[recs["rank"].isna()]
    assert (missed["target"] == 1).all() and (missed["score"].to_numpy() <= cut[missed["user_id"]].to_numpy()).all()
    # nothing the user trained on is recommended
    trained = examples.loc[examples["split"] == "train", ["user_id", "item_id"]].drop_duplicates()
    assert ranked.merge(trained, on=["user_id", "item_id"]).empty
    # the held-out items no training row holds are counted and scored apart (cold_recall@K)
    test = examples[examples["split"] == "test"].drop_duplicates(["user_id", "item_id"])
    cold = test[~test["item_id"].isin(trained["item_id"]) & test["item_id"].isin(task.catalog["item_id"])]
    metrics = json.loads((run["reports"] / "metrics.json").read_text())
    assert metrics["n_cold_held_out"] == len(cold) > 0
    cold_recall = {k: v for k, v in metrics["two_tower"].items() if k.startswith("cold_recall@")}
    assert set(cold_recall) == {k.replace("recall@", "cold_recall@") for k in metrics["two_tower"]
                                if k.startswith("recall@")}
    assert all(0 <= v <= 1 for v in cold_recall.values())
    assert metrics["most_popular"]["cold_recall@20"] == 0.0       # popularity puts them last


def test_report_without_a_live_model_writes_quality_and_drift(run: dict, tmp_path: Path):
    reports = tmp_path / "reports"
    t0 = time.perf_counter()
    summary = _report(run, reports, tmp_path / "published")
    print(f"report stage on {summary} took {time.perf_counter() - t0:.1f} s")
    quality = json.loads((reports / "quality" / "quality.json").read_text())
    assert FIGURES <= set(quality) and quality["k"] == K and quality["users"] > 100
    assert quality["previous"]["skipped"] == "no previous published model"
    # Evidently's ranking figures agree with the evaluate stage's on the same recommendations
    metrics = json.loads((run["reports"] / "metrics.json").read_text())["two_tower"]
    for name in ("ndcg", "recall", "hitrate"):
        assert quality[f"{name}@{K}"] == pytest.approx(metrics[f"{name}@{K}"], abs=1e-6), name
    page = (reports / "quality" / "quality.html").read_text()
    assert len(page) > 100_000 and "Model quality: live model not compared: no previous published model" in page

    drift = json.loads((reports / "drift" / "summary.json").read_text())
    window = drift["window"]
    assert 0 <= window["drift_share"] <= 1 and window["n_columns"] >= 8 and window["threshold"] == 0.0
    assert window["window_rows"] == CFG.drift.min_window_rows and 1 <= len(window["calibration"]) <= CFG.drift.windows
    assert all(len(c["natural"]) == 2 for c in window["columns"].values())
    assert window["current_rows"] > 0 and window["reference_rows"] > 0
    assert {"rating", "item_popularity", "item_year", "user_gender", "hour_of_day", "day_of_week"} <= \
        set(json.dumps(json.loads((reports / "drift" / "window.json").read_text())).split('"'))
    assert drift["published"] == {"skipped": "no previous published model"}
    assert "no previous published model" in (reports / "drift" / "published.html").read_text()
    assert json.loads((reports / "drift" / "published.json").read_text()) == drift["published"]
    assert (reports / "drift" / "window.html").stat().st_size > 100_000
    sample = pd.read_parquet(reports / "drift" / "reference.parquet")
    assert 0 < len(sample) <= CFG.drift_rows and "rating" in sample and "user_id" not in sample
    assert summary["live_version"] is None and summary["window_drift_share"] == window["drift_share"]


def test_report_against_the_live_bundle(run: dict, tmp_path: Path):
    """A first run is published (its files and model copied into versions/v1 as publish does); the
    second run of the same data compares with it: no drift, the same figures on the same holdout."""
    published = tmp_path / "published"
    first = tmp_path / "first"
    _report(run, first, published)
    _publish_first(run, first, published)

    second = tmp_path / "second"
    summary = _report(run, second, published)
    assert summary["live_version"] == "v1" and summary["published_drift_share"] == 0.0
    drift = json.loads((second / "drift" / "summary.json").read_text())["published"]
    assert drift["live_version"] == "v1" and drift["n_drifted"] == 0 and drift["n_columns"] >= 8
    quality = json.loads((second / "quality" / "quality.json").read_text())
    previous = quality["previous"]
    mine = json.loads((run["reports"] / "metrics.json").read_text())["two_tower"]
    assert previous["version"] == "v1" and previous["metrics"] == previous["challenger"] == mine
    assert previous["cold_users"] == previous["cold_items"] == 0 and previous["n_users"] > 100
    page = (second / "quality" / "quality.html").read_text()
    assert "Model quality: this run vs live v1, both on this run&#x27;s holdout (0 of" in page


def test_a_live_model_of_another_source_is_a_new_lineage(run: dict, tmp_path: Path):
    """The same data under another data.source: drift and quality are not compared, and say why;
    gate.compare_across_sources asks for both anyway."""
    published, first = tmp_path / "published", tmp_path / "first"
    _report(run, first, published)
    _publish_first(run, first, published, source="/elsewhere/movielens")
    second = tmp_path / "second"
    _report(run, second, published)
    why = f"new source: this run reads {run['root'] / 'data' / 'source'}, live v1 was trained on /elsewhere/movielens"
    assert json.loads((second / "drift" / "summary.json").read_text())["published"] == {"skipped": why}
    previous = json.loads((second / "quality" / "quality.json").read_text())["previous"]
    assert previous["skipped"] == f"{why} (gate.compare_across_sources is false)" and "metrics" not in previous
    champion = json.loads((second / "champion.json").read_text())
    assert champion["compared"] and champion["lineage"]["change"] == why       # scored, the gate decides
    strict = tmp_path / "strict"
    _report(run, strict, published, strict=True)
    assert json.loads((strict / "drift" / "summary.json").read_text())["published"]["n_drifted"] == 0
    assert json.loads((strict / "quality" / "quality.json").read_text())["previous"]["lineage_change"] == why


def test_a_shifted_newest_window_is_flagged(run: dict, tmp_path: Path):
    """The newest window's rows (by time) happen at 03:00 and rate everything 5: both columns are far
    beyond the range the earlier windows showed, the other columns are not."""
    training = tmp_path / "training"
    shutil.copytree(run["training"], training)
    ingested = tmp_path / "ingested"
    shutil.copytree(run["ingested"], ingested)
    newest_keys = None
    for path, column in ((training / "examples.parquet", None), (ingested / "interactions.parquet", "rating")):
        df = pd.read_parquet(path)
        ts = pd.to_datetime(df["timestamp"], utc=True)
        if newest_keys is None:   # the newest window of the examples: min_window_rows rows
            newest_keys = set(df.loc[ts.sort_values(kind="stable").index[-CFG.drift.min_window_rows:],
                                     ["user_id", "item_id"]].itertuples(index=False, name=None))
        newest = pd.Series([k in newest_keys for k in df[["user_id", "item_id"]].itertuples(index=False, name=None)],
                           index=df.index)
        df["timestamp"] = ts.where(~newest, ts.dt.floor("D") + pd.Timedelta(hours=3))
        if column:
            df.loc[newest, column] = 5.0
        df.to_parquet(path, index=False)
    summary = report(CFG, DriftLimits(), 0, ingested, training, run["reports"] / "quality" / "recs.parquet",
                     tmp_path / "published", tmp_path / "drift", tmp_path / "quality")
    window = json.loads((tmp_path / "drift" / "summary.json").read_text())["window"]
    assert {"rating", "hour_of_day"} <= set(window["drifted_columns"])
    assert "user_gender" not in window["drifted_columns"] and "item_year" not in window["drifted_columns"]
    assert window["dataset_drift"] is True and summary["window_drift_share"] > 0
    page = (tmp_path / "drift" / "window.html").read_text()
    assert "towerflow-drift" in page and "natural range" in page


def test_short_data_skips_the_window_and_missing_inputs_are_named(run: dict, tmp_path: Path):
    cfg = CFG.model_copy(update={"drift": CFG.drift.model_copy(update={"min_window_rows": 2000})})
    _report(run, tmp_path / "reports", tmp_path / "published", cfg)
    window = json.loads((tmp_path / "reports" / "drift" / "summary.json").read_text())["window"]
    rows = len(pd.read_parquet(run["training"] / "examples.parquet"))
    assert window["rows"] == rows and window["skipped"].startswith(f"not judged: {rows} rows: ")
    assert "report.drift.min_window_rows=2000" in window["skipped"]
    with pytest.raises(MissingStageInput, match=r"recs.parquet: not found; run the evaluate stage first"):
        report(CFG, DriftLimits(), 0, run["ingested"], run["training"], tmp_path / "recs.parquet",
               tmp_path / "published", tmp_path / "d", tmp_path / "q")
    with pytest.raises(MissingStageInput, match=r"examples.parquet: not found; run the materialize stage first"):
        _report(run, tmp_path / "r", tmp_path / "published", training=tmp_path / "nowhere")


def test_the_interaction_rows_are_let_go_before_the_quality_report(run: dict, tmp_path: Path, monkeypatch):
    """The quality report's distance matrices are the stage's peak: one after the other (report.workers
    1, or auto above AUTO_MAX_BESIDE_ROWS training rows), the examples, the ratings and the interaction
    frame (gigabytes at 10M rows) are no longer held under them."""
    import gc
    import weakref

    import flows.stages.report as stage

    held: dict[str, weakref.ref] = {}
    real_read, real_frame, real_quality = stage.read_training, stage.interaction_frame, stage._quality

    def read(*args):
        data = real_read(*args)
        held.update(examples=weakref.ref(data.examples), interactions=weakref.ref(data.interactions))
        return data

    def frame(data):
        out = real_frame(data)
        held["frame"] = weakref.ref(out.rows)
        return out

    def quality(*args, **kwargs):
        gc.collect()
        assert set(held) == {"examples", "interactions", "frame"}
        assert [name for name, ref in held.items() if ref() is not None] == []
        return real_quality(*args, **kwargs)

    monkeypatch.setattr(stage, "read_training", read)
    monkeypatch.setattr(stage, "interaction_frame", frame)
    monkeypatch.setattr(stage, "_quality", quality)
    _report(run, tmp_path / "reports", tmp_path / "published", CFG.model_copy(update={"workers": 1}))
    assert FIGURES <= set(json.loads((tmp_path / "reports" / "quality" / "quality.json").read_text()))


def test_the_drift_reports_run_beside_the_quality_report(run: dict, tmp_path: Path, monkeypatch):
    """With two usable cores (report.workers auto, a small training split) the drift reports run in a
    forked process while the quality report runs in another: the same verdicts and figures as one after
    the other (scores to ~1e-14: numpy's sums vary with memory alignment), and the report writes both."""
    import os

    import flows.stages.report as stage

    pids = tmp_path / "pids"
    real_window, real_quality = stage._window_drift, stage._quality

    def record(what: str, real):
        def wrapped(*args, **kwargs):
            with pids.open("a") as f:
                f.write(f"{what} {os.getpid()}\n")
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(stage, "_window_drift", record("drift", real_window))
    monkeypatch.setattr(stage, "_quality", record("quality", real_quality))
    monkeypatch.setattr("models.fork_pool.usable_cores", lambda: 2)
    beside = _report(run, tmp_path / "beside", tmp_path / "published")
    ran = dict(line.split() for line in pids.read_text().splitlines())
    assert set(ran) == {"drift", "quality"}
    assert len({ran["drift"], ran["quality"], str(os.getpid())}) == 3
    pids.unlink()
    one = _report(run, tmp_path / "one", tmp_path / "published", CFG.model_copy(update={"workers": 1}))
    assert set(dict(line.split() for line in pids.read_text().splitlines()).values()) == {str(os.getpid())}
    assert beside.keys() == one.keys() and beside[f"ndcg@{K}"] == one[f"ndcg@{K}"]
    for name in ("window", "published"):
        share = one[f"{name}_drift_share"]
        assert beside[f"{name}_drift_share"] == (share if share is None else pytest.approx(share, rel=1e-9))
    drift = [json.loads((tmp_path / d / "drift" / "summary.json").read_text()) for d in ("beside", "one")]
    assert drift[0]["window"].get("drifted") == drift[1]["window"].get("drifted")
    quality = [json.loads((tmp_path / d / "quality" / "quality.json").read_text()) for d in ("beside", "one")]
    assert {k: quality[0][k] for k in FIGURES} == {k: quality[1][k] for k in FIGURES}
