"""sample + train stages on synthetic contract data (tests/datagen.py), built without the materialize
stage: the helpers below write data/training/ and schema.json the way ARCHITECTURE.md specifies."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.params import ModelParams, SampleParams, TrainParams
from tests.datagen import make_contract_dataset


def temporal_examples(users: pd.DataFrame, inter: pd.DataFrame, test_fraction: float = 0.2,
                      min_user_interactions: int = 5, history_length: int = 50) -> pd.DataFrame:
    """examples.parquet rows: each user's last test_fraction (by time) is 'test'; recent_items = the
    user's items strictly before the row's timestamp, newest first (a plain-pandas stand-in for Feast)."""
    inter = inter.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    if "weight" not in inter.columns:
        inter["weight"] = 1.0
    pos = inter.groupby("user_id").cumcount()
    size = inter.groupby("user_id")["item_id"].transform("size")
    n_test = np.where(size >= min_user_interactions, np.floor(size * test_fraction).astype(int), 0)
    inter["split"] = np.where(pos >= size - n_test, "test", "train")
    recent = []
    for _, g in inter.groupby("user_id", sort=False):
        ts, ids = g["timestamp"].to_numpy(), g["item_id"].to_list()
        before = np.searchsorted(ts, ts, side="left")     # rows strictly earlier in time
        recent += [ids[:b][::-1][:history_length] for b in before]
    inter["recent_items"] = recent
    return inter.merge(users, on="user_id", how="left")


def write_training_dir(root: Path, users: pd.DataFrame, items: pd.DataFrame, inter: pd.DataFrame,
                       schema: dict) -> tuple[Path, Path]:
    training = root / "training"
    training.mkdir(parents=True, exist_ok=True)
    temporal_examples(users, inter).to_parquet(training / "examples.parquet", index=False)
    items.to_parquet(training / "items.parquet", index=False)
    schema_path = root / "schema.json"
    schema_path.write_text(json.dumps(schema))
    return training, schema_path


def synthetic_training_dir(root: Path, string_ids: bool = False, **kwargs) -> tuple[Path, Path]:
    """datagen's taste-group data as data/training/ + schema.json; returns (training_dir, schema_path)."""
    src = make_contract_dataset(root / "source", string_ids=string_ids, **kwargs)
    users, items = pd.read_parquet(src / "users.parquet"), pd.read_parquet(src / "items.parquet")
    inter = pd.read_parquet(src / "interactions.parquet")
    id_dtype = "string" if string_ids else "int64"
    schema = {
        "user_id_dtype": id_dtype, "item_id_dtype": id_dtype,
        "user_features": {"categorical": ["age_bucket", "gender", "occupation"], "numeric": [], "multi": []},
        "item_features": {"categorical": [], "numeric": ["year"], "multi": ["genres"]},
        "has_rating": True, "ranking_logs": "none", "source": str(src),
    }
    return write_training_dir(root, users, items.drop(columns=["title"]), inter, schema)


FAST_TRAIN = TrainParams(epochs=8, batch_size=256, lr=0.005, threads=1, early_stopping=False)
SMALL_MODEL = ModelParams(dim=32, embedding_dim=32, hidden=[64])


def run_sample_train(root: Path, training: Path, schema: Path, seed: int = 0,
                     train_cfg: TrainParams = FAST_TRAIN, model: ModelParams = SMALL_MODEL) -> Path:
    from flows.stages.sample import sample
    from flows.stages.train import train

    sample(training, SampleParams(popular_threshold=0.01), seed, root / "samples")
    train(root / "samples", training, schema, model, train_cfg, seed, root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    training, schema = synthetic_training_dir(root)
    return root, training, schema


def test_sample_is_deterministic_and_downsamples_popular_items(synthetic, tmp_path):
    from flows.stages.sample import sample

    _, training, _ = synthetic
    a = sample(training, SampleParams(popular_threshold=0.005), 7, tmp_path / "a")
    b = sample(training, SampleParams(popular_threshold=0.005), 7, tmp_path / "b")
    c = sample(training, SampleParams(popular_threshold=0.005), 8, tmp_path / "c")
    assert a == b
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a/full.parquet"),
                                  pd.read_parquet(tmp_path / "b/full.parquet"))
    assert not pd.read_parquet(tmp_path / "a/full.parquet").equals(pd.read_parquet(tmp_path / "c/full.parquet"))

    examples = pd.read_parquet(training / "examples.parquet")
    train_part = pd.read_parquet(tmp_path / "a/train.parquet")
    assert set(train_part["split"]) == {"train"}
    assert a["train"]["rows"] == int((examples["split"] == "train").sum())
    assert a["full"]["kept"] + a["full"]["dropped"] == len(examples)
    assert list(train_part.columns) == [*examples.columns, "hard_negatives"]

    # the most popular item loses a larger share of its positives than a rare one
    full = pd.read_parquet(tmp_path / "a/full.parquet")
    before, after = examples["item_id"].value_counts(), full["item_id"].value_counts()
    kept_share = after.reindex(before.index, fill_value=0) / before
    assert kept_share.iloc[0] < 0.6
    assert (kept_share[before <= 3] == 1.0).all()


def test_train_writes_models_metrics_and_loss_curve(synthetic):
    root, training, schema = synthetic
    model_dir = run_sample_train(root, training, schema)
    for name in ("eval", "full"):
        for f in ("model.pt", "encoder.json", "model.json"):
            assert (model_dir / name / f).exists()
    metrics = json.loads((model_dir / "train_metrics.json").read_text())
    assert metrics["eval"]["epochs"] == FAST_TRAIN.epochs and metrics["eval"]["examples_per_s"] > 0
    assert sorted(p.name for p in (model_dir / "curves").iterdir()) == ["eval.csv", "full.csv"]
    for name in ("eval", "full"):
        loss = pd.read_csv(model_dir / "curves" / f"{name}.csv")
        assert list(loss.columns) == ["epoch", "loss"] and loss["epoch"].tolist() == list(range(1, 9))
        assert loss["loss"].iloc[-1] == pytest.approx(metrics[name]["final_loss"], abs=1e-6)
        assert loss["loss"].iloc[-1] < loss["loss"].iloc[0]    # it learns


def test_train_without_refit_copies_eval_model(synthetic, tmp_path):
    from flows.stages.sample import sample
    from flows.stages.train import train

    _, training, schema = synthetic
    sample(training, SampleParams(), 0, tmp_path / "samples")
    cfg = TrainParams(epochs=1, batch_size=256, refit_full=False, threads=1, early_stopping=False)
    metrics = train(tmp_path / "samples", training, schema, SMALL_MODEL, cfg, 0, tmp_path / "model")
    assert metrics["full"] == {"copy_of": "eval"}
    assert (tmp_path / "model/full/model.pt").read_bytes() == (tmp_path / "model/eval/model.pt").read_bytes()


def test_train_reports_missing_samples(synthetic, tmp_path):
    from flows.errors import MissingStageInput
    from flows.stages.train import train

    _, training, schema = synthetic
    with pytest.raises(MissingStageInput, match="train.parquet"):
        train(tmp_path / "nowhere", training, schema, SMALL_MODEL, FAST_TRAIN, 0, tmp_path / "model")


def _stream_and_config(training: Path, schema: Path, samples: Path):
    from models.encoding import FeatureEncoder
    from models.training import TrainingStream, model_config

    items = pd.read_parquet(training / "items.parquet")
    examples = pd.read_parquet(training / "examples.parquet")
    train_part = examples[examples["split"] == "train"].reset_index(drop=True)
    encoder = FeatureEncoder.fit(json.loads(schema.read_text()), items, train_part)
    stream = TrainingStream.build(encoder, pd.read_parquet(samples / "train.parquet"), items)
    return encoder, stream, model_config(encoder, SMALL_MODEL), train_part


def test_resume_after_interruption_ends_like_an_uninterrupted_run(synthetic, tmp_path):
    import torch

    from flows.stages.sample import sample
    from models.training import fit

    torch.set_num_threads(1)
    _, training, schema = synthetic
    sample(training, SampleParams(), 0, tmp_path / "samples")
    _, stream, config, _ = _stream_and_config(training, schema, tmp_path / "samples")
    cfg = TrainParams(epochs=4, batch_size=256, threads=1, negatives=8, ssl_weight=0.1, lr_schedule="cosine")
    whole = fit(stream, config, cfg, seed=3)

    class Killed(Exception):
        pass

    def kill_after_two(epoch: int) -> None:
        if epoch == 2:
            raise Killed

    ckpt = tmp_path / "ckpt" / "eval.pt"
    with pytest.raises(Killed):
        fit(stream, config, cfg, seed=3, checkpoint=ckpt, on_epoch=kill_after_two)
    assert ckpt.exists()
    resumed = fit(stream, config, cfg, seed=3, checkpoint=ckpt)
    assert resumed.resumed_from == 2 and len(resumed.losses) == 4
    assert resumed.losses == whole.losses
    for name, tensor in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_early_stopping_stops_when_validation_stops_improving(synthetic, tmp_path):
    import torch

    from flows.stages.sample import sample
    from models.training import fit
    from models.early_stopping import ValidationTask, carve, outside

    torch.set_num_threads(1)
    _, training, schema = synthetic
    sample(training, SampleParams(), 0, tmp_path / "samples")
    encoder, _, config, train_part = _stream_and_config(training, schema, tmp_path / "samples")
    val = train_part[carve(train_part, 0.2).to_numpy()]
    fit_rows = train_part[outside(train_part, val)]
    assert 0 < len(val) < len(train_part) and len(fit_rows) + len(val) == len(train_part)
    task = ValidationTask.build(encoder, fit_rows, val)
    from models.training import TrainingStream
    items = pd.read_parquet(training / "items.parquet")
    stream = TrainingStream.build(encoder, fit_rows, items)
    # a learning rate this high overfits the tiny data within a few epochs
    cfg = TrainParams(epochs=40, batch_size=128, lr=0.05, patience=2, threads=1)
    result = fit(stream, config, cfg, seed=0, validation=task)
    assert result.stopped_early and len(result.losses) < 40
    assert len(result.val_ndcg) == len(result.losses) == result.best_epoch + cfg.patience
    assert max(result.val_ndcg[result.best_epoch:]) <= result.val_ndcg[result.best_epoch - 1]


def _retrieved_logs(training: Path, out: Path) -> Path:
    """Ranking logs: each of 300 interactions' requests retrieved 5 other items never shown."""
    examples = pd.read_parquet(training / "examples.parquet")
    rng = np.random.default_rng(0)
    items = examples["item_id"].unique()
    rows = examples.sample(300, random_state=0)
    pd.DataFrame({
        "request_id": np.repeat([f"r{i}" for i in range(len(rows))], 5),
        "user_id": np.repeat(rows["user_id"].to_numpy(), 5),
        "item_id": rng.choice(items, 5 * len(rows)),
        "timestamp": np.repeat(rows["timestamp"].to_numpy(), 5),
        "stage": "retrieved", "position": pd.array([None] * 5 * len(rows), dtype="Int64"),
        "ranker_score": 0.0, "clicked": False,
    }).drop_duplicates(["request_id", "item_id"]).to_parquet(out, index=False)
    return out


@pytest.mark.parametrize("loss", ["listwise", "pairwise", "pointwise"])
def test_train_stage_with_every_loss_hard_negatives_and_ssl(synthetic, tmp_path, loss):
    from flows.stages.sample import sample
    from flows.stages.train import train

    _, training, schema = synthetic
    _retrieved_logs(training, tmp_path / "logs.parquet")
    summary = sample(training, SampleParams(hard_negatives=4), 0, tmp_path / "samples", tmp_path / "logs.parquet")
    assert summary["train"]["examples_with_hard_negatives"] > 0 and summary["hard_negatives"]["note"] is None
    cfg = TrainParams(epochs=3, batch_size=256, threads=1, loss=loss, negatives=8, ssl_weight=0.2, patience=1)
    metrics = train(tmp_path / "samples", training, schema, SMALL_MODEL, cfg, 0, tmp_path / "artifacts/model")
    assert metrics["eval"]["hard_negatives_per_example"] > 0
    assert metrics["eval"]["epochs"] == metrics["validation"]["best_epoch"] == metrics["full"]["epochs"]
    curves = tmp_path / "artifacts/model/curves"
    assert sorted(p.stem for p in curves.iterdir()) == ["eval", "full", "validation"]
    validation = pd.read_csv(curves / "validation.csv")
    assert list(validation.columns) == ["epoch", "loss", "val_ndcg@20"]
    assert validation["val_ndcg@20"].tolist() == pytest.approx(metrics["validation"]["val_ndcg@20"], abs=1e-6)
    assert all(np.isfinite(pd.read_csv(p)["loss"]).all() for p in curves.iterdir())
    assert not (tmp_path / "artifacts/model_ckpt").exists() or not any((tmp_path / "artifacts/model_ckpt").iterdir())


def test_train_without_ranking_logs_says_so(synthetic, tmp_path):
    from flows.stages.sample import sample
    from flows.stages.train import train

    _, training, schema = synthetic
    summary = sample(training, SampleParams(), 0, tmp_path / "samples", ranking_logs=None)
    assert summary["hard_negatives"]["note"].startswith("no hard negatives")
    cfg = TrainParams(epochs=1, batch_size=256, threads=1, negatives=4, early_stopping=False, refit_full=False)
    metrics = train(tmp_path / "samples", training, schema, SMALL_MODEL, cfg, 0, tmp_path / "model")
    assert "no hard negatives" in metrics["eval"]["hard_negatives_note"]


def test_stream_read_from_disk_in_batches_equals_the_in_memory_one(synthetic, tmp_path):
    """from_parquet (small batches, memory-mapped spill) builds the same arrays as build(), trains to
    the same weights, and pickles as file paths (what data-parallel workers receive)."""
    import pickle

    import torch

    from flows.stages.sample import sample
    from models.training import TrainingStream, fit

    torch.set_num_threads(1)
    _, training, schema = synthetic
    sample(training, SampleParams(hard_negatives=4), 0, tmp_path / "samples",
           _retrieved_logs(training, tmp_path / "logs.parquet"))
    encoder, memory, config, _ = _stream_and_config(training, schema, tmp_path / "samples")
    items = pd.read_parquet(training / "items.parquet")
    disk = TrainingStream.from_parquet(encoder, tmp_path / "samples" / "train.parquet", items,
                                       spill=tmp_path / "spill", batch_rows=97)
    assert len(disk) == len(memory) > 97 * 3
    assert memory.users.keys() == disk.users.keys()
    for name in memory.users:
        torch.testing.assert_close(disk.users[name], memory.users[name], rtol=0, atol=0, msg=name)
    for name in ("item_idx", "weights", "counts", "hard", "pos_ptr", "pos_items"):
        torch.testing.assert_close(getattr(disk, name), getattr(memory, name), rtol=0, atol=0, msg=name)
    assert disk.hard.shape[1] > 0 and {"history", "hard"} <= set(disk.mapped)
    assert all(p.parent == tmp_path / "spill" and p.exists() for p in disk.mapped.values())

    wire = pickle.dumps(disk)
    assert len(wire) < disk.users["history"].numel() * 8 / 4      # the history travels as a path
    again = pickle.loads(wire)
    torch.testing.assert_close(again.users["history"], disk.users["history"], rtol=0, atol=0)

    cfg = TrainParams(epochs=2, batch_size=128, threads=1, negatives=4, ssl_weight=0.1)
    a, b = fit(memory, config, cfg, seed=5), fit(disk, config, cfg, seed=5)
    assert a.losses == b.losses


def test_learned_temperature_trains_and_round_trips(synthetic, tmp_path):
    import torch

    from flows.stages.sample import sample
    from models.inference import load_bundle
    from models.training import fit, save_model
    from models.towers import MIN_TAU

    torch.set_num_threads(1)
    _, training, schema = synthetic
    sample(training, SampleParams(), 0, tmp_path / "samples")
    encoder, stream, config, _ = _stream_and_config(training, schema, tmp_path / "samples")
    config.learn_temperature, config.temperature = True, 0.2
    result = fit(stream, config, TrainParams(epochs=3, batch_size=256, threads=1, lr=0.01), seed=1)
    tau = result.summary(len(stream))["learned_temperature"]
    assert MIN_TAU <= tau and abs(tau - 0.2) > 1e-3            # it moved from its start
    save_model(tmp_path / "m", result.model, encoder)
    loaded = load_bundle(tmp_path / "m").model
    assert float(loaded.tau().detach()) == pytest.approx(tau, abs=1e-5)
