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


FAST_TRAIN = TrainParams(epochs=8, batch_size=256, lr=0.005, threads=1)
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
    assert list(train_part.columns) == list(examples.columns)

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
    loss = pd.read_csv(model_dir / "loss.csv")
    assert list(loss.columns) == ["epoch", "model", "loss"]
    assert set(loss["model"]) == {"eval", "full"} and len(loss) == 2 * FAST_TRAIN.epochs
    eval_loss = loss[loss["model"] == "eval"]["loss"].to_numpy()
    assert eval_loss[-1] < eval_loss[0]  # it learns


def test_train_without_refit_copies_eval_model(synthetic, tmp_path):
    from flows.stages.sample import sample
    from flows.stages.train import train

    _, training, schema = synthetic
    sample(training, SampleParams(), 0, tmp_path / "samples")
    cfg = TrainParams(epochs=1, batch_size=256, refit_full=False, threads=1)
    metrics = train(tmp_path / "samples", training, schema, SMALL_MODEL, cfg, 0, tmp_path / "model")
    assert metrics["full"] == {"copy_of": "eval"}
    assert (tmp_path / "model/full/model.pt").read_bytes() == (tmp_path / "model/eval/model.pt").read_bytes()


def test_train_reports_missing_samples(synthetic, tmp_path):
    from flows.errors import MissingStageInput
    from flows.stages.train import train

    _, training, schema = synthetic
    with pytest.raises(MissingStageInput, match="train.parquet"):
        train(tmp_path / "nowhere", training, schema, SMALL_MODEL, FAST_TRAIN, 0, tmp_path / "model")
