"""Publishing item vectors to Qdrant: versioning, verification, atomic alias switch, pruning.

Real Qdrant (local mode on disk in tmp_path, or :memory:) and real vectors; nothing is mocked.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from qdrant_client import models

from flows.errors import PublishError, TowerflowError
from flows.serving.index import (
    alias_target,
    content_version,
    open_qdrant,
    publish_vectors,
    query_top_k,
    upsert_points,
    verify_collection,
)

PREFIX, ALIAS = "items", "items_live"


@pytest.fixture(autouse=True)
def _local_qdrant(monkeypatch: pytest.MonkeyPatch) -> None:
    # These tests are about the embedded mode; a developer's QDRANT_URL must not redirect them.
    monkeypatch.delenv("QDRANT_URL", raising=False)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ours(client) -> set[str]:
    return {c.name for c in client.get_collections().collections if c.name.startswith(PREFIX + "_")}


def publish(client, vectors, ids, keep=3, **kw):
    return publish_vectors(client, vectors, ids, prefix=PREFIX, alias=ALIAS, keep_versions=keep,
                           batch_size=kw.pop("batch_size", 64), verify_sample=kw.pop("verify_sample", 16), **kw)


def test_two_publishes_make_two_versions_and_the_alias_follows_the_newest(tmp_path: Path) -> None:
    # Small on disk: local mode commits every point to SQLite separately (~20 ms each here).
    ids = list(range(1000, 1080))
    v1, v2 = unit_vectors(80, 16, 1), unit_vectors(80, 16, 2)
    with open_qdrant(tmp_path / "q") as client:
        r1 = publish(client, v1, ids)
        r2 = publish(client, v2, ids)
    assert r1.collection != r2.collection and r2.previous == r1.collection
    assert r1.verified and r2.verified and r1.count == r2.count == 80 and r2.dim == 16
    # Reopen: everything is on disk, and queries through the alias hit the new version.
    with open_qdrant(tmp_path / "q") as client:
        assert ours(client) == {r1.collection, r2.collection}
        assert alias_target(client, ALIAS) == r2.collection
        (hits,) = query_top_k(client, ALIAS, v2[[7]], k=1)
        assert hits[0][0] == ids[7] and hits[0][1] == pytest.approx(1.0, abs=1e-5)


def test_republishing_the_same_vectors_reuses_the_verified_collection() -> None:
    ids = [f"i{i:03d}" for i in range(120)]
    vecs = unit_vectors(120, 8, 3)
    with open_qdrant(":memory:") as client:
        first = publish(client, vecs, ids)
        again = publish(client, vecs, ids)
        assert not first.reused and again.reused
        assert again.collection == first.collection == f"{PREFIX}_{content_version(vecs, ids)}"
        assert ours(client) == {first.collection}
        assert alias_target(client, ALIAS) == first.collection


def test_a_leftover_of_an_interrupted_publish_is_rebuilt(tmp_path: Path) -> None:
    ids = list(range(60))
    vecs = unit_vectors(60, 8, 4)
    name = f"{PREFIX}_{content_version(vecs, ids)}"
    with open_qdrant(tmp_path / "q") as client:
        # What a process killed mid-upsert leaves behind: the right name, half the points.
        client.create_collection(name, vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
        upsert_points(client, name, vecs[:30], ids[:30], batch_size=20)
        result = publish(client, vecs, ids)
        assert result.collection == name and not result.reused
        assert client.count(name, exact=True).count == 60
        verify_collection(client, name, vecs, ids, sample=60)


def test_verification_catches_stored_vectors_that_differ_from_the_encoded_ones() -> None:
    ids = list(range(50))
    vecs = unit_vectors(50, 8, 5)
    with open_qdrant(":memory:") as client:
        client.create_collection("c", vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
        upsert_points(client, "c", vecs, ids, batch_size=20)
        verify_collection(client, "c", vecs, ids, sample=50)
        other = vecs.copy()
        other[49] = unit_vectors(1, 8, 6)[0]
        with pytest.raises(PublishError, match=r"stored vector of item_id 49 differs"):
            verify_collection(client, "c", other, ids, sample=50)
        with pytest.raises(PublishError, match=r"holds 50 points, expected 49"):
            verify_collection(client, "c", vecs[:49], ids[:49], sample=10)


def test_a_failed_verification_leaves_the_alias_on_the_previous_version(tmp_path: Path) -> None:
    ids = list(range(100))
    v1, v2 = unit_vectors(100, 8, 7), unit_vectors(100, 8, 8)
    v2_name = f"{PREFIX}_{content_version(v2, ids)}"
    with open_qdrant(tmp_path / "q") as client:
        live = publish(client, v1, ids).collection
        # A collection already holds v2's version name with other content, and another alias
        # (a canary) serves it, so publish may neither reuse nor delete it.
        client.create_collection(v2_name, vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
        upsert_points(client, v2_name, unit_vectors(100, 8, 9), ids, batch_size=100)
        client.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=v2_name, alias_name="canary"))])
        with pytest.raises(PublishError, match=rf"does not match.*left on '{live}'"):
            publish(client, v2, ids)
        assert alias_target(client, ALIAS) == live
        (hits,) = query_top_k(client, ALIAS, v1[[3]], k=1)
        assert hits[0][0] == 3


def test_invalid_vectors_fail_before_anything_is_created() -> None:
    ids = list(range(10))
    with open_qdrant(":memory:") as client:
        bad = unit_vectors(10, 4, 0)
        bad[2, 1] = np.nan
        with pytest.raises(PublishError, match=r"not finite \(first: item_id 2\)"):
            publish(client, bad, ids)
        with pytest.raises(PublishError, match=r"item_id 3 appears more than once"):
            publish(client, unit_vectors(10, 4, 0), ids[:9] + [3])
        with pytest.raises(PublishError, match=r"10 ids, vectors of shape \(9, 4\)"):
            publish(client, unit_vectors(9, 4, 0), ids)
        assert ours(client) == set() and alias_target(client, ALIAS) is None


def test_pruning_keeps_keep_versions_and_never_the_live_one(tmp_path: Path) -> None:
    ids = list(range(40))
    vs = [unit_vectors(40, 8, s) for s in range(10, 15)]
    with open_qdrant(tmp_path / "q") as client:
        names = [publish(client, v, ids, keep=3).collection for v in vs[:3]]
        assert ours(client) == set(names)
        fourth = publish(client, vs[3], ids, keep=3)
        assert fourth.pruned == [names[0]]                      # the oldest goes
        # Roll back to the oldest remaining version with keep=2: it is reused, becomes live, and
        # survives although it is older than names[2], which is pruned instead.
        rollback = publish(client, vs[1], ids, keep=2)
        assert rollback.reused and rollback.collection == names[1]
        assert rollback.pruned == [names[2]]
        assert ours(client) == {names[1], fourth.collection}
        # keep=1 with a canary alias on another version: a served collection is never deleted.
        client.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=fourth.collection, alias_name="canary"))])
        last = publish(client, vs[4], ids, keep=1)
        assert last.pruned == [names[1]]
        assert ours(client) == {last.collection, fourth.collection}
        assert alias_target(client, ALIAS) == last.collection


def test_query_over_fetches_and_drops_excluded_items() -> None:
    ids = [f"item-{i}" for i in range(60)]
    vecs = unit_vectors(60, 8, 20)
    users = unit_vectors(3, 8, 21)
    with open_qdrant(":memory:") as client:
        publish(client, vecs, ids)
        brute = np.argsort(-(vecs @ users.T), axis=0, kind="stable").T      # (users, items)
        seen = [{ids[brute[0][0]], ids[brute[0][2]], "not-in-catalog"}, set(), {ids[j] for j in brute[2][:50]}]
        got = query_top_k(client, ALIAS, users, k=5, exclude=seen)
        for u in range(3):
            want = [ids[j] for j in brute[u] if ids[j] not in seen[u]][:5]
            assert [item for item, _ in got[u]] == want
            assert all(item not in seen[u] for item, _ in got[u])
        assert len(got[2]) == 5
        # More than the catalog: every remaining item once, nothing invented.
        (everything,) = query_top_k(client, ALIAS, users[[2]], k=100, exclude=[seen[2]])
        assert len(everything) == 60 - 50


def test_local_storage_is_single_process(tmp_path: Path) -> None:
    with open_qdrant(tmp_path / "q"):
        with pytest.raises(TowerflowError, match="open in another process"):
            with open_qdrant(tmp_path / "q"):
                pass
    with open_qdrant(tmp_path / "q"):  # closed on exit, so it opens again
        pass


# --- the publish stage on a real (tiny) trained model -------------------------------------------

def training_with_model(root: Path, string_ids: bool = False) -> tuple[Path, Path, Path]:
    """data/training (examples with split + recent_items, items) + schema.json from tests/datagen.py,
    and a model trained on it by the sample and train stages; returns (training, schema, model_dir)."""
    from datagen import make_contract_dataset
    from flows.stages.sample import sample
    from flows.stages.train import train
    from models.params import ModelParams, SampleParams, TrainParams

    src = make_contract_dataset(root / "source", n_users=80, n_items=60, seed=2, string_ids=string_ids)
    users, items = pd.read_parquet(src / "users.parquet"), pd.read_parquet(src / "items.parquet")
    inter = pd.read_parquet(src / "interactions.parquet").sort_values(["user_id", "timestamp", "item_id"])
    inter = inter.drop(columns="rating").assign(weight=1.0).reset_index(drop=True)
    pos = inter.groupby("user_id").cumcount()
    size = inter.groupby("user_id")["item_id"].transform("size")
    inter["split"] = np.where(pos >= np.ceil(size * 0.8), "test", "train")
    inter["recent_items"] = [list(g["item_id"].iloc[:i][::-1]) for _, g in inter.groupby("user_id", sort=False)
                             for i in range(len(g))]
    training = root / "training"
    training.mkdir()
    inter.merge(users, on="user_id").to_parquet(training / "examples.parquet", index=False)
    items.drop(columns="title").to_parquet(training / "items.parquet", index=False)
    dtype = "string" if string_ids else "int64"
    schema = root / "schema.json"
    schema.write_text(json.dumps({
        "user_id_dtype": dtype, "item_id_dtype": dtype,
        "user_features": {"categorical": ["age_bucket", "gender", "occupation"], "numeric": [], "multi": []},
        "item_features": {"categorical": [], "numeric": ["year"], "multi": ["genres"]},
        "has_rating": True, "ranking_logs": "none", "source": str(src)}))
    sample(SampleParams(popular_threshold=0.01), 0, training, None, root / "samples")
    train(ModelParams(dim=8, embedding_dim=8, hidden=[16]), TrainParams(epochs=1, batch_size=128, threads=1), 0,
          root / "samples", training, schema, root / "model")
    return training, schema, root / "model"


@pytest.mark.parametrize("string_ids", [False, True])
def test_publish_stage_writes_vectors_and_manifest_and_is_idempotent(tmp_path: Path, string_ids: bool) -> None:
    from flows.params import PublishParams
    from flows.stages.publish import publish as publish_stage
    from models.inference import load_bundle

    training, _, model_root = training_with_model(tmp_path, string_ids)
    cfg = PublishParams(collection_prefix="t", alias="t_live", keep_versions=2, upsert_batch=25, verify_sample=8)
    index, qdrant = tmp_path / "index", tmp_path / "qdrant"
    first = publish_stage(model_root / "full", training, cfg, index, qdrant)

    items = pd.read_parquet(training / "items.parquet")
    stored = pd.read_parquet(index / "item_vectors.parquet")
    assert stored["item_id"].tolist() == items["item_id"].tolist()
    assert stored["item_id"].dtype == items["item_id"].dtype
    encoded = load_bundle(model_root / "full").encode_items(items)
    np.testing.assert_allclose(np.stack(stored["vector"].to_numpy()), encoded, atol=1e-6)
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest == first
    assert manifest["count"] == len(items) and manifest["dim"] == 8 and manifest["verified"] is True
    assert manifest["collection"] == f"t_{manifest['version']}" and manifest["previous"] is None

    # Same model again: same version, the verified collection is reused, the alias stays.
    again = publish_stage(model_root / "full", training, cfg, index, qdrant)
    assert again["version"] == first["version"] and again["reused"] is True
    # The eval model is a different model: a new version, and the first stays for rollback.
    other = publish_stage(model_root / "eval", training, cfg, index, qdrant)
    assert other["version"] != first["version"] and other["previous"] == first["collection"]
    with open_qdrant(qdrant) as client:
        assert alias_target(client, "t_live") == other["collection"]
        assert {c.name for c in client.get_collections().collections} == {first["collection"], other["collection"]}
        eval_vectors = load_bundle(model_root / "eval").encode_items(items)
        (hits,) = query_top_k(client, "t_live", eval_vectors[[0]], k=1)
        assert hits[0][1] == pytest.approx(1.0, abs=1e-5)     # the live index holds the eval model's vectors


def test_publish_stage_names_missing_inputs(tmp_path: Path) -> None:
    from flows.errors import MissingStageInput
    from flows.params import PublishParams
    from flows.stages.publish import publish as publish_stage

    with pytest.raises(MissingStageInput, match="items.parquet"):
        publish_stage(tmp_path / "model", tmp_path / "training", PublishParams(), tmp_path / "index", tmp_path / "q")
    (tmp_path / "training").mkdir()
    pd.DataFrame({"item_id": [1, 2]}).to_parquet(tmp_path / "training" / "items.parquet")
    with pytest.raises(MissingStageInput, match="model.pt"):
        publish_stage(tmp_path / "model", tmp_path / "training", PublishParams(), tmp_path / "index", tmp_path / "q")
    assert not (tmp_path / "index").exists()
