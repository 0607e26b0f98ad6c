"""New items without retraining: POST /items and `towerflow index add-items FILE` encode them with
the live item tower and upsert them into the live index; the bundle's append-only sidecar carries
them through a crash, a new publish and a rollback. Real model, real Qdrant; nothing is mocked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from flows.cli import app
from flows.serving.bundles import BundleStore
from flows.serving.items import read_additions
from tests.serving.test_api import Service, known_users, run_publish, service  # noqa: F401 (fixture)

NEW = {"item_id": 5000, "genres": ["zzz"], "year": 1999}


def test_post_items_then_search_filter_events_publish_and_rollback(service: Service) -> None:
    store = BundleStore(service.root / "artifacts/published")
    old = store.live()
    r = service.post("/items", {"items": [NEW, {"item_id": 5001, "genres": ["comedy"]}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"added": 2, "version": old, "item_ids": [5000, 5001]}

    assert service.get("/similar", item_id=5000, k=3).status_code == 200
    user = known_users(service.root, 1)[0]
    only = service.get("/recommend", user_id=user, k=5, filter=json.dumps({"genres": "zzz"})).json()
    assert [i["item_id"] for i in only["items"]] == [5000]
    assert service.post("/events", {"user_id": user, "item_id": 5000}).status_code == 200
    assert service.get("/recommend", user_id=user, k=5, filter=json.dumps({"genres": "zzz"})).json()["items"] == []

    added = read_additions(store.versions / old)
    assert added["item_id"].tolist() == [5000, 5001] and np.isfinite(np.stack(added["vector"])).all()
    assert service.get("/version").json()["items"] == len(pd.read_parquet(service.root / "data/training/items.parquet")) + 2

    # A new version learns the added items (encoded by its own item tower), a rollback keeps them.
    new = run_publish(service.root, model="eval")["version"]
    service.wait_for(lambda: service.get("/version").json()["version"] == new)
    assert service.get("/similar", item_id=5000, k=3).status_code == 200
    again = read_additions(store.versions / new)
    assert sorted(again["item_id"]) == [5000, 5001]
    assert not np.allclose(np.stack(again["vector"]), np.stack(added["vector"]))      # another model
    assert CliRunner().invoke(app, ["index", "rollback", "--params", str(service.root / "params.yaml")]).exit_code == 0
    service.wait_for(lambda: service.get("/version").json()["version"] == old)
    assert service.get("/similar", item_id=5001, k=3).status_code == 200
    assert len(read_additions(store.versions / old)) == 2          # nothing added twice


def test_bad_items_are_refused_with_the_reason(service: Service) -> None:
    first = int(pd.read_parquet(service.root / "data/training/items.parquet")["item_id"].iloc[0])
    cases = [
        ({"item_id": first}, 409, f"item_id {first} already exists in version"),
        ({"item_id": 6000, "colour": "red"}, 422,
         "items: unknown item feature column 'colour'; the live model's item features are: "),
        ({"item_id": "x6000"}, 422, "items[0].item_id: 'x6000' is not an int64 id"),
        ({"item_id": 6000, "year": "new"}, 422, "items[0].year: 'new' is not a number"),
        ({"item_id": 6000, "genres": {"a": 1}}, 400, "items[0].genres: Input should be a valid"),
        ({"item_id": 6000, "genres": "x" * 2000}, 400, "items[0].genres: String should have at most 1024 characters"),
        # digits too: a lax float took them as 0.0 past the bound
        ({"item_id": 6000, "genres": ["0" * 2000]}, 400, "items[0].genres: "),
        ({"genres": ["a"]}, 422, "missing required column 'item_id'"),
    ]
    for item, status, message in cases:
        r = service.post("/items", {"items": [item]})
        assert r.status_code == status and message in r.json()["error"], (item, r.status_code, r.text)
    r = service.post("/items", {"items": [{"item_id": 6000}, {"item_id": 6000}]})
    assert r.status_code == 409 and "item_id 6000 appears more than once" in r.json()["error"]   # as one there
    r = service.post("/items", {"items": [{"item_id": 7000 + i} for i in range(4)]})
    assert r.status_code == 413 and "4 items exceed serve.max_items (3)" in r.json()["error"]
    assert read_additions(service.root / "artifacts/published/versions" / service.state.served.version).empty


def test_cli_add_items_while_the_service_holds_the_index(service: Service) -> None:
    path = service.root / "new_items.csv"
    path.write_text("item_id,genres,year\n5100,kids|docs,2001\n")
    result = CliRunner().invoke(app, ["index", "add-items", str(path), "--params", str(service.root / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "recorded 1 items for version" in result.output and "the running service" in result.output
    service.wait_for(lambda: service.get("/similar", item_id=5100, k=2).status_code == 200)
    result = CliRunner().invoke(app, ["index", "add-items", str(path), "--params", str(service.root / "params.yaml")])
    assert result.exit_code == 1 and "item_id 5100 already exists in version" in result.output


def test_cli_add_items_alone_and_a_crash_before_the_upsert(project: Path) -> None:
    from flows.serving.items import add_items, catalog_ids, normalize_items
    from flows.serving.recommend import Recommender
    from flows.serving.state import LiveState

    run_publish(project)
    params = str(project / "params.yaml")
    path = project / "new_items.jsonl"
    path.write_text(json.dumps({"item_id": 5200, "genres": ["scifi"], "year": 1980}) + "\n")
    result = CliRunner().invoke(app, ["index", "add-items", str(path), "--params", params])
    assert result.exit_code == 0 and result.output.startswith("added 1 items to version"), result.output
    bad = project / "bad.csv"
    bad.write_text("item_id,colour\n5300,red\n")
    result = CliRunner().invoke(app, ["index", "add-items", str(bad), "--params", params])
    assert result.exit_code == 1 and "unknown item feature column 'colour'" in result.output
    bad.write_text("item_id,year\n5300,1990\nx5301,1991\n")      # a text id where ids are integers
    result = CliRunner().invoke(app, ["index", "add-items", str(bad), "--params", params])
    assert result.exit_code == 1 and f"{bad}:3 item_id: 'x5301' is not an int64 id" in result.output, result.output

    published = project / "artifacts/published"
    with Recommender.load_live(published, project / "data/feast", project / "data/features") as rec:
        assert rec.index.vector_of(5200) is not None
        # As if killed after the sidecar was written, before the upsert:
        items = normalize_items(pd.DataFrame([{"item_id": 5201, "year": 1990}]), rec.schema, "test")
        add_items(rec, published, items, catalog_ids(rec.bundle_dir), upsert=False)
        assert rec.index.vector_of(5201) is None
    state = LiveState(published, project / "data/feast", project / "data/features")
    state.start(watch=False)
    try:
        assert state.served.rec.index.vector_of(5201) is not None and 5201 in state.served.known_items
    finally:
        state.stop()
