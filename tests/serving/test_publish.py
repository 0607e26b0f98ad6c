"""The publish stage and the bundle store: one verified, immutable bundle per version, LIVE switched
atomically, history, rollback, pruning, refusals that leave the live version alone.

Real model (one CPU epoch on tiny data), real Qdrant engines; nothing is mocked.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.errors import MissingStageInput, PublishError
from flows.params import PublishParams
from flows.serving.bundles import BundleStore
from flows.stages.publish import publish


def run_publish(root: Path, model: str = "full", **cfg) -> dict:
    params = {"verify_users": 20, "upsert_batch": 20, **cfg}
    return publish(root / "artifacts/model" / model, root / "data/training", root / "data/ingested/schema.json",
                   PublishParams(**params), root / "artifacts/published")


def cli(*args: str) -> "CliRunner.Result":
    return CliRunner().invoke(app, list(args))


def test_publish_writes_one_complete_bundle_and_makes_it_live(project: Path) -> None:
    from models.inference import load_bundle

    summary = run_publish(project)
    store = BundleStore(project / "artifacts/published")
    version = summary["version"]
    assert summary["action"] == "built" and store.live() == version and store.complete() == [version]
    bundle = store.versions / version
    for name in ("model/model.pt", "model/encoder.json", "model/model.json", "schema.json", "items.parquet",
                 "item_vectors.parquet", "bundle.json"):
        assert (bundle / name).is_file(), name
    assert any((bundle / "index").iterdir())
    meta = store.meta(version)
    items = pd.read_parquet(project / "data/training/items.parquet")
    assert meta["count"] == len(items) and meta["dim"] == 8 and meta["backend"] == "qdrant-local"
    assert meta["previous"] is None and version.endswith(meta["digest"][:8])
    assert meta["verification"]["recall_at_100"] == 1.0 and meta["verification"]["recall_queries"] == 20
    stored = pd.read_parquet(bundle / "item_vectors.parquet")
    assert stored["item_id"].tolist() == items["item_id"].tolist()
    encoded = load_bundle(project / "artifacts/model/full").encode_items(items)
    np.testing.assert_allclose(np.stack(stored["vector"].to_numpy()), encoded, atol=1e-6)
    assert list(pd.read_parquet(bundle / "items.parquet").columns) == ["item_id", "year", "genres"]
    (entry,) = store.history()
    assert entry["action"] == "publish" and entry["from"] is None and entry["to"] == version and entry["who"]

    again = run_publish(project)     # the same content: a no-op that keeps the live one
    assert again["action"] == "unchanged" and again["version"] == version
    assert store.complete() == [version] and len(store.history()) == 1


def test_new_model_new_version_then_rollback_which_a_rerun_respects(project: Path) -> None:
    store = BundleStore(project / "artifacts/published")
    first = run_publish(project)["version"]
    second = run_publish(project, model="eval")
    assert second["action"] == "built" and second["previous"] == first and store.live() == second["version"]
    assert store.meta(second["version"])["previous"] == first

    params = project / "params.yaml"
    result = cli("index", "rollback", "--to", "nope", "--params", str(params))
    assert result.exit_code == 1
    assert f"unknown version 'nope'; available: {first}, {second['version']} (live)" in result.output
    result = cli("index", "rollback", "--reason", "bad ctr", "--params", str(params))
    assert result.exit_code == 0, result.output
    assert store.live() == first and f"live: {first} (was {second['version']})" in result.output
    assert store.history()[-1] | {"when": None} == {"action": "rollback", "from": second["version"], "to": first,
                                                   "who": store.history()[-1]["who"], "when": None, "reason": "bad ctr"}
    result = cli("index", "rollback", "--params", str(params))
    assert result.exit_code == 1 and "has no earlier version" in result.output

    listed = cli("index", "list", "--params", str(params))
    assert listed.exit_code == 0
    lines = listed.output.strip().splitlines()
    assert lines[1].startswith(f"* {first}") and lines[2].startswith(f"  {second['version']}")
    assert "qdrant-local" in lines[1]

    # A rerun publishing the eval model again must not undo the rollback behind the user's back...
    with pytest.raises(PublishError, match=rf"this content is version {second['version']}, rolled back by .*"
                                           rf"\(bad ctr\); .*`towerflow index rollback --to {second['version']}`"):
        run_publish(project, model="eval")
    assert store.live() == first
    # ... and `dvc repro` does not see the rollback as a changed output: only the run record is one.
    record = json.loads((store.root / "last_publish.json").read_text())
    assert record["version"] == second["version"] and record["action"] == "built"
    result = cli("index", "rollback", "--to", second["version"], "--params", str(params))
    assert result.exit_code == 0 and store.live() == second["version"]


def test_pruning_keeps_keep_versions_and_never_the_live_one(project: Path) -> None:
    store = BundleStore(project / "artifacts/published")
    # Index settings are part of a bundle's content: each m gives a new version of the same model.
    versions = [run_publish(project, hnsw_m=m, keep_versions=2)["version"] for m in (4, 5, 6)]
    assert store.complete() == versions[1:]
    store.switch(versions[1], "rollback", "test")
    newest = run_publish(project, hnsw_m=7, keep_versions=1)
    assert set(newest["pruned"]) == set(versions[1:]) and store.complete() == [newest["version"]]
    store.switch(newest["version"], "rollback", "test")   # the live one survives keep_versions=1
    assert store.prune(1) == []


def test_edge_backend_bundle_answers_with_hnsw(project: Path) -> None:
    from flows.serving.index import IndexSettings, open_index

    summary = run_publish(project, backend="qdrant-edge", quantization="scalar")
    store = BundleStore(project / "artifacts/published")
    meta = store.meta(summary["version"])
    assert meta["backend"] == "qdrant-edge" and meta["settings"]["quantization"] == "scalar"
    assert meta["verification"]["recall_at_100"] >= 0.95
    vectors = pd.read_parquet(store.live_dir() / "item_vectors.parquet")
    with open_index("qdrant-edge", IndexSettings.from_dict(meta["settings"]), path=store.live_dir() / "index") as index:
        (hits,) = index.search(np.stack(vectors["vector"].to_numpy())[[3]], 1)
        assert hits[0][1] == pytest.approx(1.0, abs=1e-3)   # itself, or an item with the same vector
    auto = run_publish(project, backend="auto", local_max_items=10)       # 50 items > 10: edge
    assert auto["backend"] == "qdrant-edge"


def test_a_failed_verification_exits_non_zero_and_leaves_live_alone(project: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.serving.verify as verify

    live = run_publish(project)["version"]
    monkeypatch.setattr(verify, "ann_recall", lambda *a, **k: 0.5)   # as a too-coarse HNSW would measure
    result = cli("stage", "publish", "--set", "publish.hnsw_m=4", "--params", str(project / "params.yaml"))
    assert result.exit_code == 1
    assert "ANN recall@100 0.500 < publish.min_recall 0.95" in result.output
    assert f"the live version ({live}) is unchanged" in result.output
    store = BundleStore(project / "artifacts/published")
    assert store.live() == live and store.complete() == [live]
    assert not list(store.versions.glob(".partial-*"))


def test_publish_names_missing_inputs(tmp_path: Path) -> None:
    cfg, published = PublishParams(), tmp_path / "published"
    with pytest.raises(MissingStageInput, match="items.parquet: not found; run the materialize stage"):
        publish(tmp_path / "model", tmp_path / "training", tmp_path / "schema.json", cfg, published)
    (tmp_path / "training").mkdir()
    pd.DataFrame({"item_id": [1, 2]}).to_parquet(tmp_path / "training" / "items.parquet")
    with pytest.raises(MissingStageInput, match="model.pt: not found; run the train stage"):
        publish(tmp_path / "model", tmp_path / "training", tmp_path / "schema.json", cfg, published)
    assert not published.exists()


def test_one_publish_at_a_time(project: Path) -> None:
    store = BundleStore(project / "artifacts/published")
    with store.locked():
        with pytest.raises(PublishError, match="another publish or rollback is running"):
            run_publish(project)
    assert store.live() is None


def test_bundle_json_is_the_record_of_what_went_live(project: Path) -> None:
    summary = run_publish(project)
    meta = json.loads((project / "artifacts/published/versions" / summary["version"] / "bundle.json").read_text())
    assert set(meta) >= {"version", "digest", "model_digest", "backend", "collection", "count", "dim", "distance",
                         "verification", "created_at", "previous", "settings"}
    assert meta["settings"]["fields"] == {"year": "float", "genres": "keyword"}


class _SharedClient:
    """One in-memory Qdrant standing in for a server: every `server_client()` gets it, and
    closing a handle does not drop the data (as closing a connection to a server would not)."""

    def __init__(self) -> None:
        from qdrant_client import QdrantClient
        self.client = QdrantClient(location=":memory:")

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.client, name)

    def close(self) -> None:
        pass


def test_server_backend_moves_the_alias_with_publish_and_rollback(project: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import flows.serving.index.qdrant_server as server
    from flows.serving.recommend import Recommender

    warnings.simplefilter("ignore")   # in-memory stand-in: "payload indexes have no effect"
    shared = _SharedClient()
    monkeypatch.setenv("QDRANT_URL", "http://qdrant.test:6333")
    monkeypatch.setattr(server, "server_client", lambda: shared)
    store = BundleStore(project / "artifacts/published")
    cfg = {"collection_prefix": "items", "alias": "items_live", "keep_versions": 2}

    first = run_publish(project, **cfg)
    meta = store.meta(first["version"])
    assert first["backend"] == meta["backend"] == "qdrant-server" and not any((store.live_dir() / "index").iterdir())
    assert meta["collection"] == f"items_{first['version']}" and meta["alias"] == "items_live"
    assert server.alias_target(shared.client, "items_live") == meta["collection"]
    second = run_publish(project, model="eval", **cfg)
    second_collection = store.meta(second["version"])["collection"]
    assert server.alias_target(shared.client, "items_live") == second_collection

    users = pd.read_parquet(project / "data/ingested/interactions.parquet")["user_id"].unique()[:2].tolist()
    with Recommender.load_live(store.root, project / "data/feast", project / "data/features") as rec:
        assert rec.index.collection == second_collection and len(rec.recommend(users, 3)) == 6

    result = cli("index", "rollback", "--params", str(project / "params.yaml"))
    assert result.exit_code == 0, result.output
    assert store.live() == first["version"] and server.alias_target(shared.client, "items_live") == meta["collection"]
    # A third version (keep 2: it and the newest other) prunes the oldest; its collection goes too.
    third = run_publish(project, hnsw_m=8, **cfg)
    assert third["pruned"] == [first["version"]]
    names = {c.name for c in shared.client.get_collections().collections}
    assert names == {second_collection, store.meta(third["version"])["collection"]}


def test_publishing_to_an_embedded_edge_index_does_not_import_the_qdrant_client():
    """The publish stage and the qdrant-edge backend (catalogs above publish.local_max_items) leave
    qdrant_client unimported: its import (pydantic models of the whole HTTP API) was 2.6 s of a 30k-item
    publish that never talked to a server."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys\nimport flows.stages.publish\nimport flows.serving.verify\n"
              "from flows.serving.index.qdrant_edge import EdgeIndex\n"
              "from flows.serving.index.base import collection_name, server_url\n"
              "print(any(m == 'qdrant_client' or m.startswith('qdrant_client.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).parents[2]))
    assert out.stdout.strip() == "False", out.stderr
