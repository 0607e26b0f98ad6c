"""Incremental runs (docs/INCREMENTAL.md): serving events ingested with the source, and train.update:
finetune starting from the live bundle's model, growing its vocabularies, or falling back to full."""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import torch

from flows.params import DataParams, SimulatorParams, TrainSection
from flows.stages.ingest import ingest, source_changed
from flows.stages.train import train
from models.checkpoint import load_model
from models.encoding import Vocab
from models.errors import ModelError
from models.finetune import IncompatibleModel, extend_encoder, grow_model, update_rows, write_rows
from models.params import ModelParams, SampleParams
from models.training import tower_config
from tests.datagen import make_contract_dataset
from tests.training_data import SMALL_MODEL, run_sample, synthetic_training_dir

SIM = SimulatorParams(candidates=40, ranked=20, shown=5)
# no early stopping, few epochs: the tests compare starting points, not final quality
FULL = TrainSection(epochs=3, batch_size=256, lr=0.005, threads=1, early_stopping=False, refit_full=False)
FINETUNE = FULL.model_copy(update={"update": "finetune", "finetune_epochs": 1})


def _log_events(events_dir: Path, rows: list[dict]) -> None:
    events_dir.mkdir(parents=True, exist_ok=True)
    with (events_dir / "events-20260101.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, "received_at": "2026-01-01T00:00:00Z"}) + "\n")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_contract_dataset(tmp_path_factory.mktemp("source"), n_users=40, n_items=30, seed=5)


def test_ingest_appends_logged_events_once(source, tmp_path):
    data = DataParams(source=str(source), ranking_logs="none")
    cache, out, events = tmp_path / "cache", tmp_path / "ingested", tmp_path / "events"
    before = ingest(data, SIM, 0, cache, out, events_dir=events)           # no events folder: as always
    assert "events" not in before and "events" not in json.loads((out / "schema.json").read_text())
    assert not source_changed(data, cache, events)
    src = pd.read_parquet(source / "interactions.parquet")
    known = src.iloc[0]
    # as an older service logged it: no weight (1.0 is the contract's default)
    new = {"user_id": int(known.user_id), "item_id": int(known.item_id), "timestamp": "2026-01-01T00:00:00Z",
           "rating": 4.0}
    _log_events(events, [new, new,                                          # a retried POST
                         {**new, "item_id": 999_999},                       # an item the source lacks
                         {"user_id": int(known.user_id), "item_id": int(known.item_id),
                          "timestamp": known.timestamp.isoformat(), "rating": float(known.rating)}])
    assert source_changed(data, cache, events)                               # `towerflow run` re-ingests
    summary = ingest(data, SIM, 0, cache, out, events_dir=events)
    assert summary["events"] == {"read": 4, "added": 1, "duplicates": 2, "unknown": 1, "quarantined": 0}
    assert summary["interactions"] == before["interactions"] + 1
    got = pd.read_parquet(out / "interactions.parquet")
    assert got["timestamp"].max() == pd.Timestamp("2026-01-01", tz="UTC") and got["weight"].iloc[-1] == 1.0
    assert json.loads((out / "schema.json").read_text())["events"]["added"] == 1
    assert not source_changed(data, cache, events)
    first = (out / "interactions.parquet").read_bytes()
    ingest(data, SIM, 0, cache, out, events_dir=events)                      # nothing new: nothing changes
    assert (out / "interactions.parquet").read_bytes() == first
    off = data.model_copy(update={"events": False})
    assert ingest(off, SIM, 0, cache, out, events_dir=events)["interactions"] == before["interactions"]


def test_events_that_break_the_contract_are_quarantined_and_the_run_goes_on(source, tmp_path):
    """An older log, a rule tightened since, a torn line: quarantined with the reason and counted;
    validate then passes on what ingest wrote (the source's own rows keep the strict gate)."""
    from flows.sources.events_log import CURSOR, QUARANTINE
    from flows.stages.validate import validate
    from validation.params import ValidateParams

    data = DataParams(source=str(source), ranking_logs="none")     # not the demo: ratings are required
    cache, out, events = tmp_path / "cache", tmp_path / "ingested", tmp_path / "events"
    known = pd.read_parquet(source / "interactions.parquet").iloc[0]
    ok = {"user_id": int(known.user_id), "item_id": int(known.item_id), "timestamp": "2026-01-01T00:00:00Z",
          "rating": 4.0, "weight": 2.0}
    _log_events(events, [ok,
                         {**ok, "user_id": "not-a-number"},                 # not an id of this source
                         {k: v for k, v in ok.items() if k != "rating"},    # no rating, none to fill
                         {**ok, "weight": -1},                              # what the old door let through
                         {**ok, "timestamp": "2200-01-01T00:00:00Z"}])      # the future
    log = events / "events-20260101.jsonl"
    with log.open("a") as f:
        f.write("garbage\n" + '{"user_id": 1, "item_')                     # a corrupted line, a torn tail
    summary = ingest(data, SIM, 0, cache, out, events_dir=events)
    assert summary["events"] == {"read": 7, "added": 1, "duplicates": 0, "unknown": 0, "quarantined": 6}
    assert summary["events_quarantine"] == str(out / QUARANTINE)
    reasons = [json.loads(line)["reason"] for line in (out / QUARANTINE).read_text().splitlines()]
    assert reasons[:4] == ["user_id: ids must be int64 (schema.json) ('not-a-number' is not an int64 id)",
                           "rating: null values", "weight: negative weight",
                           "timestamp: timestamp in the future (or not tz-aware UTC, or unix milliseconds written as seconds)"]
    assert reasons[4] == "not a JSON object (a torn or corrupted line)" and "torn trailing" in reasons[5]
    # the torn tail is not consumed: the cursor stops before it, so a finished write is read next time
    assert json.loads((out / CURSOR).read_text())["files"] == {log.name: log.read_bytes().rfind(b"\n") + 1}
    result = validate(ValidateParams(), out, docs_dir=tmp_path / "docs", summary_path=tmp_path / "v.json",
                      context_root=tmp_path / "gx")
    assert result["success"] and result["events"]["quarantined"] == 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """A synthetic training set, its samples, a full training and that model published as LIVE."""
    root = tmp_path_factory.mktemp("incremental")
    training, schema = synthetic_training_dir(root, n_users=80, n_items=60)
    run_sample(training, root / "samples", SampleParams(popular_threshold=0.01))
    train(SMALL_MODEL, FULL, 0, root / "samples", training, schema, root / "model")
    published = root / "published"
    shutil.copytree(root / "model" / "full", published / "versions" / "v1" / "model")
    (published / "LIVE").write_text(json.dumps({"version": "v1"}))
    return root, training, schema, published


def _first_loss(model_dir: Path, name: str = "eval") -> float:
    return float(pd.read_csv(model_dir / "curves" / f"{name}.csv")["loss"].iloc[0])


def test_finetune_starts_from_the_live_weights(trained, tmp_path):
    root, training, schema, published = trained
    # since long ago: every row is "new", so the refit sees all rows and only its start differs from
    # the evaluated model's (trained in full: the live model saw this run's holdout, see below)
    cfg = FINETUNE.model_copy(update={"since": datetime(2000, 1, 1, tzinfo=timezone.utc), "refit_full": True})
    metrics = train(SMALL_MODEL, cfg, 0, root / "samples", training, schema, tmp_path / "model",
                    published_dir=published)
    update = metrics["full"]["update"]
    assert update["mode"] == "finetune" and update["from_version"] == "v1" and update["replay_rows"] == 0
    assert metrics["full"]["epochs"] == 1
    assert _first_loss(tmp_path / "model", "full") < _first_loss(tmp_path / "model", "eval") - 0.05
    assert (tmp_path / "model" / "full" / "model.pt").exists()
    assert not list((tmp_path / "model_ckpt").glob("*"))                     # cleaned up like a full run


def test_finetune_window_is_newer_rows_plus_replay(trained, tmp_path):
    root, training, schema, published = trained
    cfg = FINETUNE.model_copy(update={"finetune_replay": 0.5, "refit_full": True})
    metrics = train(SMALL_MODEL, cfg, 0, root / "samples", training, schema, tmp_path / "model",
                    published_dir=published)
    update = metrics["full"]["update"]
    live = json.loads((published / "versions/v1/model/model.json").read_text())
    assert update["cutoff"] == pd.Timestamp(live["data_until"]).isoformat()
    # the live model saw every training row already: the replay share and the test rows are left
    assert 0 < update["replay_rows"] < metrics["full"]["examples"] * 3
    assert update["new_rows"] == (pd.to_datetime(pd.read_parquet(root / "samples" / "full.parquet")["timestamp"],
                                                 utc=True) > pd.Timestamp(live["data_until"])).sum()


def test_the_evaluated_model_never_saw_the_holdout(trained, tmp_path):
    """The live model v1 trained on rows after the start of this run's holdout: the evaluated model
    trains in full (a fine-tune would score rows it learned); the published one still fine-tunes."""
    root, training, schema, published = trained
    metrics = train(SMALL_MODEL, FINETUNE.model_copy(update={"refit_full": True}), 0, root / "samples",
                    training, schema, tmp_path / "model", published_dir=published)
    assert metrics["eval"]["update"]["mode"] == "full" and metrics["eval"]["epochs"] == FULL.epochs
    assert "after this run's holdout starts" in metrics["eval"]["update"]["reason"]
    assert metrics["full"]["update"]["mode"] == "finetune"


def test_the_evaluated_model_finetunes_from_the_live_bundles_evaluation_model(trained, tmp_path):
    """A bundle keeps its run's evaluation model (trained without that run's holdout): the eval model
    fine-tunes from it, on the rows newer than its own data, and the published model from the served one."""
    root, training, schema, published = trained
    bundle = tmp_path / "published" / "versions" / "v1"
    shutil.copytree(published / "versions" / "v1", bundle)
    shutil.copytree(root / "model" / "eval", bundle / "eval_model")
    shutil.copy(published / "LIVE", tmp_path / "published" / "LIVE")
    metrics = train(SMALL_MODEL, FINETUNE.model_copy(update={"refit_full": True}), 0, root / "samples", training,
                    schema, tmp_path / "model", published_dir=tmp_path / "published")
    evaluated, served = metrics["eval"]["update"], metrics["full"]["update"]
    assert (evaluated["mode"], evaluated["from_model"], served["mode"], served["from_model"]) == \
        ("finetune", "eval_model", "finetune", "model")
    twin = json.loads((bundle / "eval_model" / "model.json").read_text())
    assert evaluated["cutoff"] == pd.Timestamp(twin["data_until"]).isoformat()


def test_the_evaluated_model_finetunes_from_a_live_model_older_than_the_holdout(trained, tmp_path):
    root, training, schema, _ = trained
    examples = pd.read_parquet(training / "examples.parquet")
    times = pd.to_datetime(examples["timestamp"], utc=True)
    held_from = times[examples["split"] == "test"].min()
    early = tmp_path / "early" / "training"                 # what the live model was trained on
    early.mkdir(parents=True)
    examples[times < held_from].to_parquet(early / "examples.parquet", index=False)
    shutil.copy(training / "items.parquet", early / "items.parquet")
    run_sample(early, tmp_path / "early" / "samples", SampleParams(popular_threshold=0.01))
    train(SMALL_MODEL, FULL, 0, tmp_path / "early" / "samples", early, schema, tmp_path / "early" / "model")
    published = tmp_path / "published"
    shutil.copytree(tmp_path / "early" / "model" / "full", published / "versions" / "v0" / "model")
    (published / "LIVE").write_text(json.dumps({"version": "v0"}))
    metrics = train(SMALL_MODEL, FINETUNE, 0, root / "samples", training, schema, tmp_path / "model",
                    published_dir=published)
    assert metrics["eval"]["update"]["mode"] == "finetune" and metrics["eval"]["update"]["from_version"] == "v0"


def test_finetune_without_live_bundle_trains_in_full(trained, tmp_path):
    root, training, schema, _ = trained
    metrics = train(SMALL_MODEL, FINETUNE, 0, root / "samples", training, schema, tmp_path / "model",
                    published_dir=tmp_path / "nothing_published")
    assert metrics["update"] == {"mode": "full", "note": "no live bundle to fine-tune: trained in full"}
    assert metrics["eval"]["epochs"] == FULL.epochs and "update" not in metrics["eval"]


def test_finetune_with_other_model_params_trains_in_full(trained, tmp_path):
    root, training, schema, published = trained
    wider = ModelParams(dim=16, embedding_dim=32, hidden=[64])
    metrics = train(wider, FINETUNE.model_copy(update={"refit_full": True}), 0, root / "samples", training,
                    schema, tmp_path / "model", published_dir=published)
    assert metrics["update"]["mode"] == "full" and "dim 32 -> 16" in metrics["update"]["note"]


def test_new_users_and_items_get_fresh_rows_and_trained_rows_stay(trained):
    root, *_ = trained
    model, encoder = load_model(root / "model" / "eval")
    fresh = extend_encoder(encoder, encoder)
    assert fresh.to_json() == encoder.to_json()
    grown_ids = Vocab(values=[9001, *encoder.item_ids.values[::-1], 9002], kind=encoder.item_ids.kind)
    fresh.item_ids = grown_ids
    fresh.user_ids = Vocab(values=[*encoder.user_ids.values, 77_777], kind=encoder.user_ids.kind)
    extended = extend_encoder(encoder, fresh)
    assert extended.item_ids.values == [*encoder.item_ids.values, 9001, 9002]    # trained indices kept
    assert extended.item_ids.lookup([encoder.item_ids.values[3]])[0] == 4
    grown = grow_model(model, tower_config(extended, SMALL_MODEL), seed=0)
    old, new = model.item_emb.weight.detach(), grown.item_emb.weight.detach()
    assert new.shape[0] == old.shape[0] + 2
    assert torch.equal(new[:old.shape[0]], old) and new[old.shape[0]:].abs().sum() > 0
    assert torch.equal(grown.item_tower.mlp[0].weight, model.item_tower.mlp[0].weight)
    with pytest.raises(IncompatibleModel, match="embedding_dim"):
        grow_model(model, tower_config(extended, SMALL_MODEL.model_copy(update={"embedding_dim": 8})), seed=0)


def test_update_rows_takes_newer_rows_and_a_replay_share():
    rows = pd.DataFrame({"timestamp": pd.date_range("2020-01-01", periods=1000, freq="h", tz="UTC")})
    cutoff = rows["timestamp"].iloc[799]
    picked = update_rows(rows, cutoff, replay=0.25, seed=0)
    assert picked.new == 200 and 150 < picked.replay < 250 and len(picked.rows) == picked.new + picked.replay
    assert update_rows(rows, cutoff, replay=0.0, seed=0, inclusive=True).new == 201
    assert len(update_rows(rows, None, replay=0.2, seed=0).rows) == 1000
    # a few real-time events replay a few older rows, not a fifth of the history
    few = update_rows(rows, rows["timestamp"].iloc[997], replay=0.2, seed=0, per_new=4.0)
    assert few.new == 2 and few.replay == 8 and len(few.rows) == 10
    nothing_new = update_rows(rows, rows["timestamp"].iloc[-1], replay=0.2, seed=0, per_new=4.0)
    assert nothing_new.new == 0 and len(nothing_new.rows) == 0


def test_write_rows_streams_the_chosen_rows_of_a_stream_in_their_order(tmp_path):
    """A fine-tune's rows are copied from its stream batch by batch (memory bounded by a batch), every
    column as it was, into a file that appears whole."""
    import numpy as np

    n = 1000
    rows = pd.DataFrame({"user_id": np.arange(n), "recent_items": [[i, i + 1, i + 2][:i % 4] for i in range(n)]})
    rows.to_parquet(tmp_path / "stream.parquet", index=False)
    keep = np.random.default_rng(0).random(n) < 0.3
    out = tmp_path / "update.parquet"
    assert write_rows(tmp_path / "stream.parquet", keep, out, batch_rows=64) == keep.sum()
    got = pd.read_parquet(out)
    assert got["user_id"].tolist() == np.flatnonzero(keep).tolist()
    assert got["recent_items"].map(list).tolist() == rows.loc[keep, "recent_items"].map(list).tolist()
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ModelError, match="1000 rows, but 10 row choices"):
        write_rows(tmp_path / "stream.parquet", keep[:10], out, batch_rows=64)


def test_a_finetune_with_nothing_new_keeps_the_live_weights(trained, tmp_path):
    """No interaction newer than the live model's data: the run learns nothing, so both models are
    the live bundle's (the evaluated one its evaluation model): a fine-tune on a replay sample alone
    moved every weight and fell 0.03 ndcg@20 on the demo."""
    root, training, schema, _ = trained
    bundle = tmp_path / "published" / "versions" / "v1"
    shutil.copytree(root / "model" / "full", bundle / "model")
    shutil.copytree(root / "model" / "eval", bundle / "eval_model")
    (tmp_path / "published" / "LIVE").write_text(json.dumps({"version": "v1"}))
    out = tmp_path / "again"
    metrics = train(SMALL_MODEL, FINETUNE.model_copy(update={"refit_full": True}), 0, root / "samples",
                    training, schema, out, published_dir=tmp_path / "published")
    # the evaluation model has nothing newer than its twin in the bundle: kept as it is
    assert metrics["eval"]["update"]["new_rows"] == 0 and "kept" in metrics["eval"]["update"], metrics["eval"]
    kept = torch.load(out / "eval" / "model.pt", weights_only=True)["state_dict"]
    served = torch.load(bundle / "eval_model" / "model.pt", weights_only=True)["state_dict"]
    assert kept.keys() == served.keys() and all(torch.equal(kept[k], served[k]) for k in served)
    # the fixture's served model is a copy of its eval model: the test split is new to it, and the
    # replay is scaled to what is new
    update = metrics["full"]["update"]
    assert update["new_rows"] > 0 and 0 < update["replay_rows"] <= 4 * update["new_rows"]


def test_incremental_bench_compares_full_finetune_and_stale(trained, tmp_path):
    from flows.experiments.incremental import BenchConfig, run_seeds, write

    root, training, schema, _ = trained
    (tmp_path / "ingested").mkdir()
    shutil.copy(schema, tmp_path / "ingested" / "schema.json")
    shutil.copytree(training, tmp_path / "training")
    bench = BenchConfig(increments=3, epochs=1, finetune_epochs=1)
    result = run_seeds(tmp_path, SMALL_MODEL, FULL, bench, [0], log=lambda line: None)
    write(result, tmp_path / "reports")
    assert [r["increment"] for r in result["summary"]] == [1, 2]
    step = result["runs"][0]["steps"][0]
    assert step["finetune"]["rows"] < step["full"]["rows"] and step["finetune"]["new_rows"] > 0
    assert set(step["metrics"]) == {"full", "finetune", "stale", "most_popular", "queries"}
    assert "| 2 |" in (tmp_path / "reports" / "incremental.md").read_text()


def test_incremental_bench_cli_names_the_missing_examples(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    result = CliRunner().invoke(app, ["incremental-bench", "--params", str(params), "--data", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert "examples.parquet: not found; run the materialize stage first" in result.output


def test_an_event_logged_while_ingest_runs_is_new_for_the_next_run(source, tmp_path, monkeypatch):
    import flows.stages.ingest as stage

    data = DataParams(source=str(source), ranking_logs="none", event_rating=4.0)
    cache, out, events = tmp_path / "cache", tmp_path / "ingested", tmp_path / "events"
    known = pd.read_parquet(source / "interactions.parquet").iloc[0]
    row = {"user_id": int(known.user_id), "item_id": int(known.item_id), "timestamp": "2026-01-01T00:00:00Z"}
    _log_events(events, [row])
    read = stage.append_events

    def read_then_the_service_appends(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        rows = read(*args, **kwargs)
        _log_events(events, [{**row, "timestamp": "2026-01-02T00:00:00Z"}])
        return rows

    monkeypatch.setattr(stage, "append_events", read_then_the_service_appends)
    assert ingest(data, SIM, 0, cache, out, events_dir=events)["events"]["added"] == 1
    assert source_changed(data, cache, events)        # the second event is not in the tables yet
