"""Shared test data of the model library and the model stages: data/training/ + schema.json built from
tests/datagen.py the way ARCHITECTURE.md specifies (without the materialize stage), tiny hand-made
frames, and small model/train params."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from datagen import make_contract_dataset
from models.params import ModelParams, SampleParams, TrainParams

FAST_TRAIN = TrainParams(epochs=8, batch_size=256, lr=0.005, threads=1, early_stopping=False)
SMALL_MODEL = ModelParams(dim=32, embedding_dim=32, hidden=[64])

TINY_SCHEMA = {
    "user_id_dtype": "int64", "item_id_dtype": "int64",
    "user_features": {"categorical": ["gender"], "numeric": ["age"], "multi": ["tags"]},
    "item_features": {"categorical": ["studio"], "numeric": ["year"], "multi": ["genres"]},
}


def tiny_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, examples): 4 items, 3 examples of 2 users, every feature kind, nulls and empty lists."""
    items = pd.DataFrame({
        "item_id": [10, 11, 12, 13],
        "studio": ["a", "b", "a", None],
        "year": [1990, 2000, np.nan, 2010],
        "genres": [["x", "y"], ["y"], [], ["z"]],
    })
    examples = pd.DataFrame({
        "user_id": [1, 1, 2],
        "item_id": [10, 11, 12],
        "timestamp": pd.to_datetime([1, 2, 3], unit="s", utc=True),
        "gender": ["F", "F", "M"],
        "age": [20.0, 20.0, 40.0],
        "tags": [["t1"], ["t1", "t2"], []],
        "recent_items": [[], [10], []],
    })
    return items, examples


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


def run_sample(training: Path, out_dir: Path, sample_cfg: SampleParams = SampleParams(), seed: int = 0,
               ranking_logs: Path | None = None) -> dict:
    from flows.stages.sample import sample

    return sample(sample_cfg, seed, training, ranking_logs, out_dir)


def sampled_synthetic(root: Path) -> tuple[Path, Path, Path]:
    """(training_dir, schema, samples_dir) of the synthetic data, sampled with the default params."""
    training, schema = synthetic_training_dir(root)
    run_sample(training, root / "samples")
    return training, schema, root / "samples"


def run_sample_train(root: Path, training: Path, schema: Path, seed: int = 0,
                     train_cfg: TrainParams = FAST_TRAIN, model_cfg: ModelParams = SMALL_MODEL) -> Path:
    from flows.stages.train import train

    run_sample(training, root / "samples", SampleParams(popular_threshold=0.01), seed)
    train(model_cfg, train_cfg, seed, root / "samples", training, schema, root / "model")
    return root / "model"


def stream_and_config(training: Path, schema: Path, samples: Path):  # noqa: ANN201
    """(encoder, in-memory stream of samples/train.parquet, SMALL_MODEL's tower config, training part)."""
    from models.encoding import FeatureEncoder
    from models.stream import TrainingStream
    from models.training import tower_config

    items = pd.read_parquet(training / "items.parquet")
    examples = pd.read_parquet(training / "examples.parquet")
    train_part = examples[examples["split"] == "train"].reset_index(drop=True)
    encoder = FeatureEncoder.fit(json.loads(schema.read_text()), items, train_part)
    stream = TrainingStream.build(encoder, pd.read_parquet(samples / "train.parquet"), items)
    return encoder, stream, tower_config(encoder, SMALL_MODEL), train_part


def retrieved_logs(training: Path, out: Path) -> Path:
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
