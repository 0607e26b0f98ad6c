"""The HTTP service: a real uvicorn server on a loopback port over a published bundle of the tiny
trained project (real Feast SQLite online store, real Qdrant local index); nothing is mocked.

`service` is shared with test_events.py and test_add_items.py (imported from here).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from flows.params import load_params
from flows.params import PublishParams
from flows.stages.publish import publish

SERVE_OVERRIDES = ["serve.reload_interval_s=0.1", "serve.max_batch=5", "serve.max_k=50", "serve.max_events=3",
                   "serve.max_items=3"]


def run_publish(root: Path, model: str = "full", **cfg: Any) -> dict:
    return publish(root / "artifacts/model" / model, root / "data/training", root / "data/ingested/schema.json",
                   PublishParams(verify_users=20, upsert_batch=20, **cfg), root / "artifacts/published")


@dataclass
class Service:
    url: str
    root: Path
    state: Any               # flows.serving.state.LiveState
    client: httpx.Client

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.client.get(path, params=params)

    def post(self, path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
        if content is not None:
            return self.client.post(path, content=content, headers={"content-type": "application/json"})
        return self.client.post(path, json=body)

    def wait_for(self, check: Any, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s")


def start_server(app: Any, serve_params: Any) -> tuple[Any, threading.Thread, int]:
    """uvicorn in a thread on a free loopback port, as `towerflow serve-api` runs it."""
    import uvicorn

    from flows.serving.api import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = server_config(app, serve_params)
    config.lifespan = "off"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the server did not start")
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


@contextmanager
def running(root: Path, overrides: tuple[str, ...] = (), env: dict[str, str] | None = None,
            **publish_cfg: Any) -> Iterator[Service]:
    """The project at root published once and served on a loopback port; `env` holds its tokens
    (TOWERFLOW_API_TOKEN, TOWERFLOW_READ_TOKEN; none by default)."""
    from flows.serving.api import build_service

    run_publish(root, **publish_cfg)
    params = load_params(root / "params.yaml", [*SERVE_OVERRIDES, *overrides])
    app, state = build_service(params, root, env=env or {})
    server, thread, port = start_server(app, params.serve)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield Service(url, root, state, client)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        state.stop()


@pytest.fixture
def service(project: Path) -> Iterator[Service]:
    with running(project) as svc:
        yield svc


def metric(service: Service, sample: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in service.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def known_users(root: Path, n: int) -> list[int]:
    return [int(u) for u in pd.read_parquet(root / "data/ingested/interactions.parquet")["user_id"].unique()[:n]]


# --- answers ---------------------------------------------------------------------------------------
OK_RECOMMEND = 'towerflow_requests_total{endpoint="/recommend",status="200"}'
COLD_USERS = 'towerflow_users_served_total{cold_start="true"}'


def test_recommend_similar_version_health_and_metrics(service: Service) -> None:
    # Counters are compared before/after: apps of one test process may share them (see metrics.py).
    before = metric(service, OK_RECOMMEND), metric(service, COLD_USERS)
    user, other = known_users(service.root, 2)
    rec = service.state.served.rec
    r = service.get("/recommend", user_id=user, k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    (expected,) = rec.answer([user], 5)
    assert body["user_id"] == user and body["cold_start"] is False and body["version"] == rec.version
    assert [i["item_id"] for i in body["items"]] == [item for item, _ in expected[2]]
    assert [i["rank"] for i in body["items"]] == [1, 2, 3, 4, 5]

    cold = service.get("/recommend", user_id=987654321, k=3).json()
    assert cold["cold_start"] is True and len(cold["items"]) == 3

    comedy = service.get("/recommend", user_id=user, k=5, filter=json.dumps({"genres": "comedy"})).json()
    items = pd.read_parquet(service.root / "data/training/items.parquet").set_index("item_id")
    assert comedy["items"] and all("comedy" in items.loc[i["item_id"], "genres"] for i in comedy["items"])

    batch = service.post("/recommend", {"user_ids": [user, 987654321, other, user], "k": 4, "exclude_seen": False})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r["user_id"] for r in results] == [user, 987654321, other]          # each user once, in order
    assert [r["cold_start"] for r in results] == [False, True, False] and all(len(r["items"]) == 4 for r in results)

    first = int(items.index[0])
    similar = service.get("/similar", item_id=first, k=3).json()
    assert len(similar["items"]) == 3 and first not in [i["item_id"] for i in similar["items"]]

    version = service.get("/version").json()
    assert version["version"] == rec.version and version["backend"] == "qdrant-local"
    assert version["published_at"] == rec.meta["created_at"] and version["items"] == len(items)
    assert service.get("/healthz").json()["status"] == "ok"

    assert metric(service, OK_RECOMMEND) - before[0] == 4
    assert metric(service, COLD_USERS) - before[1] == 2
    assert abs(metric(service, "towerflow_cold_start_share") - 2 / 6) < 1e-6    # this app's own share
    assert 'towerflow_request_seconds_bucket{endpoint="/recommend",le="0.01"}' in service.get("/metrics").text


# --- bad requests: each a 4xx that names the problem, never a 500 ----------------------------------
BAD_GETS = [
    ({"user_id": 1, "k": 0}, 400, "k: Input should be greater than or equal to 1"),
    ({"user_id": 1, "k": 10**9}, 400, "k must be between 1 and 50 (serve.max_k), got 1000000000"),
    ({"user_id": 1, "k": "ten"}, 400, "k: Input should be a valid integer"),
    ({"user_id": 1, "k": "²"}, 400, "k: Input should be a valid integer"),          # isdigit() says yes
    ({"user_id": 1, "k": "9" * 5000}, 400, "k: Unable to parse input string as an integer"),
    ({"user_id": "abc"}, 422, "user_id: 'abc' is not an int64 id"),
    ({"user_id": "1.5"}, 422, "user_id: '1.5' is not an int64 id"),
    ({"user_id": str(2**64)}, 422, "is out of the int64 range"),
    ({"user_id": "9" * 5000}, 400, "user_id: String should have at most 256 characters"),
    ({"user_id": 1, "filter": '{"colour": "red"}'}, 400, "unknown filter field 'colour'; filterable fields: genres, year"),
    ({"user_id": 1, "filter": '{"genres": '}, 400, "filter is not valid JSON"),
    ({"user_id": 1, "filter": '{"year": "new"}'}, 400, "filter 'year': expected a finite number, got 'new'"),
    ({"user_id": 1, "filter": "[" * 3000}, 400, "filter: the filter nests 3000 levels deep; at most 16"),
    ({"user_id": 1, "filter": "x" * 5000}, 400, "filter: String should have at most 4096 characters"),
    ({"user_id": 1, "exclude_seen": "maybe"}, 400, "exclude_seen: Input should be a valid boolean"),
    ({"user_id": 1, "user": 1}, 400, "unknown query parameter 'user'"),
    ({}, 400, "missing query parameter 'user_id'"),
]
BAD_POSTS = [
    (b'{"user_ids": [1, 2', 400, "the request body is not valid JSON"),
    (b'[1, 2]', 400, "the request body must be a JSON object"),
    (b'', 400, "the request body is missing"),
    (json.dumps({"user_ids": list(range(1, 7))}).encode(), 413, "batch of 6 users exceeds serve.max_batch (5)"),
    (json.dumps({"user_ids": [1, "x"]}).encode(), 422, "user_ids[1]: 'x' is not an int64 id"),
    (json.dumps({"user_ids": [1, 2.5]}).encode(), 400, "user_ids[1]: 2.5 is not an id"),
    (json.dumps({"user_ids": [1, 2**64]}).encode(), 422, "user_ids[1]: 18446744073709551616 is out of the int64 range"),
    (json.dumps({"user_ids": [1], "k": True}).encode(), 400, "k: Input should be a valid integer"),
    (b'{"user_ids": [1], "k": 1e400}', 400, "k: Input should be a valid integer"),
    (json.dumps({"user_ids": []}).encode(), 400, "user_ids: List should have at least 1 item"),
    (json.dumps({"user_ids": [1], "filter": {"brand": "x"}}).encode(), 400, "unknown filter field 'brand'"),
    (json.dumps({"user_ids": [1], "colour": 1}).encode(), 400, "unknown field 'colour'"),
    (b'{"user_ids": [' + b"9" * 5000 + b']}', 400, "the request body holds a number of 5000 characters; at most 64"),
    (b"[" * 3000 + b"]" * 3000, 400, "the request body nests 3000 levels deep; at most 16"),
    (b'{"user_ids": [1], "filter": ' + b'{"a": ' * 40 + b'1' + b'}' * 41, 400, "nests 41 levels deep"),
]


def test_bad_requests_are_4xx_with_a_message_naming_the_problem(service: Service) -> None:
    for params, status, message in BAD_GETS:
        r = service.get("/recommend", **params)
        assert r.status_code == status and message in r.json()["error"], (params, r.status_code, r.text)
    for content, status, message in BAD_POSTS:
        r = service.post("/recommend", content=content)
        assert r.status_code == status and message in r.json()["error"], (content[:80], r.status_code, r.text)
    r = service.get("/similar", item_id=-5)
    assert r.status_code == 404 and "item_id -5 is not in the catalog" in r.json()["error"]
    r = service.get("/recommend", user_id=1, rerank="maybe")
    assert r.status_code == 400 and "rerank: Input should be a valid boolean" in r.json()["error"]
    r = service.get("/recommend", user_id=1, rerank="true")      # this project ran no rank stage
    # not a 5xx (the fuzzer's rule) nor a Retry-After: the live version will never hold a ranker
    assert r.status_code == 422 and "run the rank stage first" in r.json()["error"]
    assert "retry-after" not in r.headers
    assert str(service.root) not in r.text                      # no absolute path in an answer
    assert service.get("/nowhere").json() == {"error": "Not Found"}
    assert service.client.put("/items", json={}).status_code == 405
    # every answer above was counted, none as a 500
    assert 'status="500"' not in service.get("/metrics").text


# --- hot reload: a publish and a rollback while requests run ---------------------------------------
def _hammer(url: str, users: list[int], stop: threading.Event, seen: list, errors: list) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        while not stop.is_set():
            try:
                r = client.get("/recommend", params={"user_id": users[i % len(users)], "k": 5})
                if r.status_code != 200 or len(r.json()["items"]) != 5:
                    errors.append((r.status_code, r.text))
                else:
                    seen.append(r.json()["version"])
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
            i += 1


def test_publish_and_rollback_switch_versions_under_load_without_errors(service: Service) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    old = service.get("/version").json()["version"]
    reloads = metric(service, 'towerflow_reloads_total{result="ok"}')
    stop, seen, errors = threading.Event(), [], []
    clients = [threading.Thread(target=_hammer, args=(service.url, known_users(service.root, 10), stop, seen, errors))
               for _ in range(3)]
    for t in clients:
        t.start()
    try:
        new = run_publish(service.root, model="eval")["version"]      # another model: a new version
        service.wait_for(lambda: service.get("/version").json()["version"] == new)
        result = CliRunner().invoke(app, ["index", "rollback", "--params", str(service.root / "params.yaml")])
        assert result.exit_code == 0, result.output
        service.wait_for(lambda: service.get("/version").json()["version"] == old)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert errors == [] and set(seen) == {old, new}, (errors[:3], set(seen))
    assert service.state.reloads == 2 and service.state.last_error is None
    assert metric(service, 'towerflow_reloads_total{result="ok"}') - reloads == 2


def test_a_version_that_fails_to_load_leaves_the_live_one_serving(service: Service) -> None:
    from flows.serving.bundles import BundleStore, write_atomic

    store = BundleStore(service.root / "artifacts/published")
    old = store.live()
    new = run_publish(service.root, model="eval")["version"]
    service.wait_for(lambda: service.get("/version").json()["version"] == new)
    # A hand-made LIVE naming a version whose model files were damaged: refused, old one answers.
    write_atomic(store.live_file, json.dumps({"version": old}) + "\n")
    service.wait_for(lambda: service.get("/version").json()["version"] == old)
    (store.versions / new / "model" / "model.pt").write_bytes(b"broken")
    write_atomic(store.live_file, json.dumps({"version": new}) + "\n")
    health = service.wait_for(lambda: (h := service.get("/healthz").json())["last_reload_error"] and h)
    assert health["version"] == old and f"version {new} did not load" in health["last_reload_error"]
    assert service.get("/recommend", user_id=known_users(service.root, 1)[0]).status_code == 200


def test_idle_connections_are_kept_open_for_serve_keep_alive_s(project: Path) -> None:
    """uvicorn's own default (5 s) is below a load balancer's idle timeout: a pooled connection
    the service closes while a request is on its way is a reset for the caller."""
    def get(sock: socket.socket) -> bytes:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return sock.recv(65536)

    with running(project, ("serve.keep_alive_s=1.5",)) as svc:
        port = int(svc.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert get(sock).startswith(b"HTTP/1.1 200")
            time.sleep(0.8)                      # idle, but within keep_alive_s: the same connection
            assert get(sock).startswith(b"HTTP/1.1 200")
            time.sleep(2.5)                      # idle past it: the service closed the connection
            assert sock.recv(65536) == b""


@pytest.mark.parametrize("backend", ["qdrant-local", "qdrant-edge"])
def test_cli_recommend_while_the_service_holds_the_index(project: Path, backend: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedded index opens in one process; the CLI searches a copy, with the items added so far."""
    import tempfile

    from typer.testing import CliRunner

    from flows.cli import app

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    params = ["--params", str(project / "params.yaml")]
    # A slow watcher: the service has not upserted the CLI's addition yet when the CLI recommends.
    with running(project, ("serve.reload_interval_s=60",), backend=backend) as svc:
        user = known_users(project, 1)[0]
        served = [i["item_id"] for i in svc.get("/recommend", user_id=user, k=5).json()["items"]]
        result = CliRunner().invoke(app, ["recommend", "--user-id", str(user), "--k", "5", *params])
        assert result.exit_code == 0, result.output
        assert [int(line.split(",")[1]) for line in result.output.strip().splitlines()[1:]] == served

        items = project / "new_items.csv"
        items.write_text("item_id,genres,year\n5200,zzz,2001\n")
        assert CliRunner().invoke(app, ["index", "add-items", str(items), *params]).exit_code == 0
        zzz = json.dumps({"genres": "zzz"})
        assert svc.get("/recommend", user_id=user, k=5, filter=zzz).json()["items"] == []   # not yet
        result = CliRunner().invoke(app, ["recommend", "--user-id", str(user), "--filter", zzz, *params])
        assert result.exit_code == 0, result.output
        assert [line.split(",")[1] for line in result.output.strip().splitlines()[1:]] == ["5200"]
        assert list(scratch.iterdir()) == []          # the copies are gone
        assert svc.get("/healthz").status_code == 200


def test_string_ids_are_served_as_strings(trained_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from tests.serving.conftest import write_params

    monkeypatch.delenv("QDRANT_URL", raising=False)
    root = tmp_path / "proj"
    shutil.copytree(trained_root(True), root, ignore=shutil.ignore_patterns("source", "cache", "samples"))
    write_params(root)
    inter = pd.read_parquet(root / "data/ingested/interactions.parquet")
    user, item = str(inter["user_id"].iloc[0]), str(inter["item_id"].iloc[0])
    with running(root) as svc:
        body = svc.get("/recommend", user_id=user, k=3).json()
        assert body["user_id"] == user and body["cold_start"] is False
        assert all(isinstance(i["item_id"], str) for i in body["items"])
        batch = svc.post("/recommend", {"user_ids": [user, "nobody"], "k": 2}).json()["results"]
        assert [(r["user_id"], r["cold_start"]) for r in batch] == [(user, False), ("nobody", True)]
        assert svc.get("/similar", item_id=item, k=2).status_code == 200
        r = svc.post("/recommend", {"user_ids": [user, 1.5]})
        assert r.status_code == 400 and "user_ids[1]: 1.5 is not an id" in r.json()["error"]
        assert svc.post("/events", {"user_id": "newcomer", "item_id": item}).status_code == 200
        assert svc.get("/recommend", user_id="newcomer", k=2).json()["cold_start"] is False
