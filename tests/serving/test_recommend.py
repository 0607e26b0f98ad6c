"""Serving: the users file parser, and recommendations end to end from a published index."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flows.errors import DataContractError
from flows.serving.recommend import read_ids_file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "users.txt"
    path.write_text(text)
    return path


def test_ids_file_header_blank_lines_and_int_ids(tmp_path: Path) -> None:
    ids = read_ids_file(write(tmp_path, "user_id\n 12\n\n7\n  \n-3\n"), "int64")
    assert ids == [12, 7, -3] and all(type(i) is int for i in ids)


def test_ids_file_string_ids_stay_strings(tmp_path: Path) -> None:
    # '007' must not become 7 and a header-less file keeps its first line.
    ids = read_ids_file(write(tmp_path, "\ufeff007\nu-1\n\nuser 2\n"), "string")
    assert ids == ["007", "u-1", "user 2"]
    assert read_ids_file(write(tmp_path, "user_id\nuser_id2\n"), "string") == ["user_id2"]


def test_ids_file_bad_int_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "user_id\n1\n\nabc\n")
    with pytest.raises(DataContractError, match=r"users\.txt:4: 'abc' is not an int64 user id"):
        read_ids_file(path, "int64")
    with pytest.raises(DataContractError, match=r":1: '1.5' is not an int64"):
        read_ids_file(write(tmp_path, "1.5\n"), "int64")
    with pytest.raises(DataContractError, match="out of the int64 range"):
        read_ids_file(write(tmp_path, str(2**63) + "\n"), "int64")


def test_ids_file_without_ids_or_missing(tmp_path: Path) -> None:
    with pytest.raises(DataContractError, match="no user ids"):
        read_ids_file(write(tmp_path, "user_id\n\n"), "int64")
    with pytest.raises(DataContractError, match="not found"):
        read_ids_file(tmp_path / "nope.txt", "int64")


# --- end to end: ingest -> materialize -> sample -> train -> publish -> recommend -----------------

def published_project(root: Path, string_ids: bool) -> dict[str, Any]:
    """A tiny project run through the real stages; returns recommend()'s keyword arguments."""
    from datagen import make_contract_dataset
    from features.params import FeaturesParams
    from flows.params import DataParams, PublishParams, SimulatorParams
    from flows.stages.ingest import ingest
    from flows.stages.materialize import materialize
    from flows.stages.publish import publish
    from flows.stages.sample import sample
    from flows.stages.train import train
    from models.params import ModelParams, SampleParams, SplitParams, TrainParams

    src = make_contract_dataset(root / "source", n_users=60, n_items=50, seed=4, string_ids=string_ids)
    ingested, training = root / "ingested", root / "training"
    ingest(DataParams(source=str(src), ranking_logs="none"), SimulatorParams(), 0, root / "cache", ingested)
    materialize(SplitParams(), FeaturesParams(history_length=10), ingested, root / "features", root / "feast", training)
    sample(SampleParams(popular_threshold=0.01), 0, training, None, root / "samples")
    train(ModelParams(dim=8, embedding_dim=8, hidden=[16]), TrainParams(epochs=1, batch_size=128, threads=1), 0,
          root / "samples", training, ingested / "schema.json", root / "model")
    cfg = PublishParams(collection_prefix="t", alias="t_live", upsert_batch=50, verify_sample=8)
    publish(root / "model" / "full", training, cfg, root / "index", root / "qdrant")
    return dict(model_dir=root / "model" / "full", feast_dir=root / "feast", features_dir=root / "features",
                schema_path=ingested / "schema.json", index_dir=root / "index", qdrant_path=root / "qdrant",
                alias="t_live")


@pytest.mark.parametrize("string_ids", [False, True], ids=["int_ids", "string_ids"])
def test_recommend_end_to_end(tmp_path: Path, string_ids: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.errors import PublishError
    from flows.serving.recommend import recommend

    monkeypatch.delenv("QDRANT_URL", raising=False)
    kw = published_project(tmp_path, string_ids)
    inter = pd.read_parquet(tmp_path / "ingested" / "interactions.parquet")
    catalog = set(pd.read_parquet(tmp_path / "training" / "items.parquet")["item_id"])
    users = list(inter["user_id"].drop_duplicates()[:5])
    unknown = "nobody" if string_ids else 987654321
    asked = [users[0], unknown, *users[1:]]

    recs = recommend(asked, 7, False, **kw)
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score"]
    assert list(recs["user_id"].drop_duplicates()) == asked
    assert all(g["rank"].tolist() == list(range(1, 8)) for _, g in recs.groupby("user_id", sort=False))
    assert all((np.diff(g["score"].to_numpy()) <= 1e-6).all() for _, g in recs.groupby("user_id"))
    assert set(recs["item_id"]) <= catalog
    # Ids as given: ints stay int64, strings stay str; item ids keep the catalog's type.
    if string_ids:
        assert all(isinstance(u, str) for u in recs["user_id"]) and all(isinstance(i, str) for i in recs["item_id"])
    else:
        assert recs["user_id"].dtype == "int64" and recs["item_id"].dtype == "int64"

    # The whole catalog: with seen items it is every item once; without, exactly the catalog minus
    # the user's history (over-fetching asked for enough), still best first.
    n = len(catalog)
    everything = recommend(users, n, True, **kw)
    unseen = recommend(users, n, False, **kw)
    for u in users:
        seen = set(inter.loc[inter["user_id"] == u, "item_id"])
        ranked = everything.loc[everything["user_id"] == u, "item_id"].tolist()
        assert len(ranked) == n and set(ranked) == catalog
        kept = unseen.loc[unseen["user_id"] == u]
        assert len(kept) == len(catalog - seen) and set(kept["item_id"]) == catalog - seen
        assert kept["rank"].tolist() == list(range(1, len(kept) + 1))
    assert not set(zip(recs["user_id"], recs["item_id"])) & set(zip(inter["user_id"], inter["item_id"]))

    # The eval model is not the one whose item vectors are published: refused, not silently wrong.
    with pytest.raises(PublishError, match="not the model the published index was built from"):
        recommend(users[:1], 5, False, **{**kw, "model_dir": kw["model_dir"].parent / "eval"})
