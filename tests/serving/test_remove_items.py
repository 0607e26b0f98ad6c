"""Removing items: DELETE /items/{id} and `towerflow index remove-items` write a tombstone in the
bundle's sidecar, replayed like the additions: the item leaves every answer now, after a restart,
in a new version and after a rollback, until it is added again. Real model, real Qdrant."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from flows.cli import app
from flows.serving.bundles import BundleStore
from flows.serving.items import catalog_ids, read_removed
from tests.serving.test_api import Service, known_users, run_publish, service  # noqa: F401 (fixture)

ZZZ = json.dumps({"genres": "zzz"})


def _zzz(svc: Service, user: int) -> list:
    return [i["item_id"] for i in svc.get("/recommend", user_id=user, k=5, filter=ZZZ).json()["items"]]


def test_delete_an_added_item_then_publish_rollback_and_add_it_again(service: Service) -> None:
    store = BundleStore(service.root / "artifacts/published")
    old = store.live()
    user = known_users(service.root, 1)[0]
    assert service.post("/items", {"items": [{"item_id": 5000, "genres": ["zzz"]}]}).status_code == 200
    assert _zzz(service, user) == [5000]
    count = service.get("/version").json()["items"]

    r = service.client.delete("/items/5000")
    assert r.status_code == 200 and r.json() == {"removed": 5000, "version": old}
    assert _zzz(service, user) == [] and service.get("/similar", item_id=5000).status_code == 404
    assert service.get("/version").json()["items"] == count - 1
    assert service.post("/events", {"user_id": user, "item_id": 5000}).status_code == 422   # not in the catalog
    r = service.client.delete("/items/5000")
    assert r.status_code == 404 and "item_id 5000 is not in the catalog of version" in r.json()["error"]
    assert service.client.delete("/items/abc").status_code == 422
    assert read_removed(store.versions / old) == {5000} and 5000 not in catalog_ids(store.versions / old)

    # A catalog item goes too, and the removal reaches a new version (its own catalog holds it).
    first = int(pd.read_parquet(service.root / "data/training/items.parquet")["item_id"].iloc[0])
    assert service.client.delete(f"/items/{first}").status_code == 200
    answers = service.post("/recommend", {"user_ids": known_users(service.root, 5), "k": 45}).json()["results"]
    assert all(first not in [i["item_id"] for i in a["items"]] for a in answers)
    new = run_publish(service.root, model="eval")["version"]
    service.wait_for(lambda: service.get("/version").json()["version"] == new)
    assert service.get("/similar", item_id=first).status_code == 404
    assert service.get("/similar", item_id=5000).status_code == 404
    assert read_removed(store.versions / new) == {first}       # 5000 was never added to it

    # Added again (in the new version): back, and a rollback brings it back to the old one too.
    r = service.post("/items", {"items": [{"item_id": 5000, "genres": ["zzz"]}]})
    assert r.status_code == 200, r.text
    assert _zzz(service, user) == [5000]
    assert CliRunner().invoke(app, ["index", "rollback", "--params", str(service.root / "params.yaml")]).exit_code == 0
    service.wait_for(lambda: service.get("/version").json()["version"] == old)
    assert _zzz(service, user) == [5000] and service.get("/similar", item_id=first).status_code == 404


def test_cli_remove_items_alone_and_while_the_service_holds_the_index(project: Path) -> None:
    from flows.serving.state import LiveState
    from tests.serving.test_api import running

    params = ["--params", str(project / "params.yaml")]
    items = project / "new.csv"
    items.write_text("item_id,genres\n5300,zzz\n5301,zzz\n")
    run_publish(project)
    assert CliRunner().invoke(app, ["index", "add-items", str(items), *params]).exit_code == 0
    result = CliRunner().invoke(app, ["index", "remove-items", "5300", *params])
    assert result.exit_code == 0 and result.output.startswith("removed 1 items from version"), result.output
    result = CliRunner().invoke(app, ["index", "remove-items", "5300", *params])
    assert result.exit_code == 1 and "item_id 5300 is not in the catalog" in result.output

    with running(project, ("serve.reload_interval_s=0.2",)) as svc:     # a restart re-applies the tombstone
        user = known_users(project, 1)[0]
        assert _zzz(svc, user) == [5301]
        result = CliRunner().invoke(app, ["index", "remove-items", "5301", *params])
        assert result.exit_code == 0 and "the running service" in result.output, result.output
        svc.wait_for(lambda: _zzz(svc, user) == [])
        assert svc.get("/similar", item_id=5301).status_code == 404

    published = project / "artifacts/published"
    state = LiveState(published, project / "data/feast", project / "data/features")
    state.start(watch=False)
    try:
        assert {5300, 5301} <= state.served.rec.index.hidden and 5301 not in state.served.known_items
    finally:
        state.stop()
