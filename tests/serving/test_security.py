"""A service safe to expose: bearer tokens for writes (and optionally reads), the Host header
checked against serve.allowed_hosts, JSON-only bodies of bounded size, no internals or secrets in
answers, and a public bind that refuses to start without a write token. Real uvicorn on loopback."""
from __future__ import annotations

from pathlib import Path

import httpx
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.serving.guard import Tokens, json_shape_error, mask_secrets, public_message
from tests.serving.test_api import known_users, run_publish, running

WRITE, READ = "write-token-0123456789", "read-token-0123456789"


def _item(root: Path) -> int:
    return int(pd.read_parquet(root / "data/training/items.parquet")["item_id"].iloc[0])


def test_writes_need_the_write_token(project: Path) -> None:
    with running(project, env={"TOWERFLOW_API_TOKEN": WRITE}) as svc:
        user, item = known_users(project, 1)[0], _item(project)
        event = {"events": [{"user_id": user, "item_id": item}]}
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": WRITE},
                        {"Authorization": f"Basic {WRITE}"}):
            r = svc.client.post("/events", json=event, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
            assert r.json() == {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}
        r = svc.client.post("/items", json={"items": [{"item_id": 7001}]})
        assert r.status_code == 401
        assert svc.client.delete(f"/items/{item}").status_code == 401
        ok = {"Authorization": f"Bearer {WRITE}"}
        assert svc.client.post("/events", json=event, headers=ok).status_code == 200
        assert svc.client.post("/items", json={"items": [{"item_id": 7001}]}, headers=ok).status_code == 200
        # reads stay open without a read token, POST /recommend included (a read)
        assert svc.get("/recommend", user_id=user).status_code == 200
        assert svc.post("/recommend", {"user_ids": [user]}).status_code == 200
        assert svc.get("/openapi.json").status_code == 200
    # the command line works locally as before: it does not go through HTTP
    items = project / "more.csv"
    items.write_text("item_id,year\n7002,2001\n")
    result = CliRunner(env={"TOWERFLOW_API_TOKEN": WRITE}).invoke(
        app, ["index", "add-items", str(items), "--params", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output


def test_a_read_token_guards_reads_but_not_healthz(project: Path) -> None:
    with running(project, env={"TOWERFLOW_API_TOKEN": WRITE, "TOWERFLOW_READ_TOKEN": READ}) as svc:
        user = known_users(project, 1)[0]
        assert svc.get("/recommend", user_id=user).status_code == 401
        assert svc.post("/recommend", {"user_ids": [user]}).status_code == 401
        assert svc.get("/metrics").status_code == 401
        for token in (READ, WRITE):   # the write token reads too
            r = svc.client.get("/recommend", params={"user_id": user}, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        r = svc.client.post("/events", json={"user_id": user, "item_id": _item(project)},
                            headers={"Authorization": f"Bearer {READ}"})
        assert r.status_code == 401                           # the read token does not write
        assert svc.get("/healthz").status_code == 200         # probes need no credentials


def test_tokens_come_from_the_environment_and_must_be_long() -> None:
    assert Tokens.from_env({}) == Tokens(None, None)
    assert Tokens.from_env({"TOWERFLOW_API_TOKEN": "  "}) == Tokens(None, None)
    with pytest.raises(Exception, match="TOWERFLOW_READ_TOKEN is 5 characters; use at least 16"):
        Tokens.from_env({"TOWERFLOW_READ_TOKEN": "short"})


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.7", "myhost.example", "::"])
def test_a_public_bind_without_a_write_token_does_not_start(project: Path, host: str) -> None:
    result = CliRunner(env={"TOWERFLOW_API_TOKEN": ""}).invoke(
        app, ["serve-api", "--host", host, "--params", str(project / "params.yaml")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"towerflow: error: --host {host} is reachable from other machines: set "
                                     "TOWERFLOW_API_TOKEN (a secret of at least 16 characters) so that writes "
                                     "need it, or bind 127.0.0.1")


def test_host_header_content_type_and_body_size(project: Path) -> None:
    with running(project, ("serve.max_body_bytes=2000",)) as svc:
        port = svc.url.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io"):
            r = svc.client.get("/healthz", headers={"Host": host})
            assert r.status_code == 400 and "is not one of serve.allowed_hosts" in r.json()["error"], host
        for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
            assert svc.client.get("/healthz", headers={"Host": host}).status_code == 200, host

        user, item = known_users(project, 1)[0], _item(project)
        body = f'{{"user_id": {user}, "item_id": {item}}}'.encode()
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"content-type": kind} if kind else {}
            r = svc.client.post("/events", content=body, headers=headers)
            assert r.status_code == 415 and "must be Content-Type: application/json" in r.json()["error"], kind
        ok = svc.client.post("/events", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200 and ok.json()["log"].startswith("events-")   # a name, not a path

        big = b'{"user_ids": [' + b"1, " * 1000 + b'1]}'
        r = svc.post("/recommend", content=big)                          # Content-Length says it
        assert r.status_code == 413 and "serve.max_body_bytes is 2000" in r.json()["error"]
        r = svc.client.post("/recommend", content=iter([big[:1500], big[1500:]]),   # chunked: counted while read
                            headers={"content-type": "application/json"})
        assert r.status_code == 413 and "exceeds serve.max_body_bytes (2000)" in r.json()["error"]


def test_allowed_hosts_star_answers_any_name(project: Path) -> None:
    with running(project, ("serve.allowed_hosts=['*']",)) as svc:
        assert svc.client.get("/healthz", headers={"Host": "recs.example.com"}).status_code == 200


def test_answers_and_messages_carry_no_secrets_or_paths(project: Path, capsys: pytest.CaptureFixture) -> None:
    url = "redis://:hunter2@cache.internal:6379/0"
    assert mask_secrets(f"REDIS_URL={url!r}: bad") == "REDIS_URL='redis://:***@cache.internal:6379/0': bad"
    assert mask_secrets("https://user:p%40ss@qdrant.example:6333 down") == "https://user:***@qdrant.example:6333 down"
    assert public_message(f"{project}/artifacts/published/LIVE not found", project) == "artifacts/published/LIVE not found"
    assert public_message("/etc/towerflow/secret.yaml is bad") == "secret.yaml is bad"
    # the CLI's one-line errors are masked too
    from flows.cli.common import _errors
    from flows.errors import ConfigError
    with pytest.raises(Exception):
        with _errors():
            raise ConfigError(f"REDIS_URL={url!r}: expected redis://[:password@]host[:port][/db]")
    assert "hunter2" not in capsys.readouterr().err

    import json

    from flows.serving.bundles import BundleStore, write_atomic
    store = BundleStore(project / "artifacts/published")
    with running(project) as svc:
        old = store.live()
        new = run_publish(project, model="eval")["version"]
        svc.wait_for(lambda: svc.get("/version").json()["version"] == new)
        write_atomic(store.live_file, json.dumps({"version": old}) + "\n")
        svc.wait_for(lambda: svc.get("/version").json()["version"] == old)
        (store.versions / new / "model" / "model.pt").write_bytes(b"broken")
        write_atomic(store.live_file, json.dumps({"version": new}) + "\n")
        health = svc.wait_for(lambda: (h := svc.get("/healthz").json())["last_reload_error"] and h)
        assert f"version {new} did not load" in health["last_reload_error"]
        assert str(project) not in health["last_reload_error"] and "model.pt" not in health["last_reload_error"]


def test_the_service_log_masks_url_passwords(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from flows.serving.guard import MaskSecrets

    logger = logging.getLogger("towerflow.test-mask")
    logger.addFilter(MaskSecrets())
    with caplog.at_level(logging.ERROR, logger="towerflow.test-mask"):
        logger.error("cannot reach %s", "redis://:hunter2@cache:6379")
    assert caplog.messages == ["cannot reach redis://:***@cache:6379"]


def test_json_shape_is_bounded_before_parsing() -> None:
    assert json_shape_error(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') is None   # inside a string
    assert json_shape_error(b'{"a": "\\" [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') is None   # escaped quote
    assert "nests 17 levels" in json_shape_error(b"[" * 17 + b"]" * 17)
    assert json_shape_error(b"[" * 16 + b"]" * 16) is None
    assert "a number of 65 characters" in json_shape_error(b"[" + b"1" * 65 + b"]")
    assert json_shape_error(b'{"id": "' + b"1" * 200 + b'"}') is None                # text, not a number


def test_unauthorized_requests_do_not_reach_the_handlers(project: Path) -> None:
    """A refused write leaves nothing behind: nothing logged, nothing added."""
    with running(project, env={"TOWERFLOW_API_TOKEN": WRITE}) as svc:
        user, item = known_users(project, 1)[0], _item(project)
        with httpx.Client(base_url=svc.url) as client:
            assert client.post("/events", json={"user_id": user, "item_id": item}).status_code == 401
            assert client.post("/items", json={"item_id": 7100}).status_code == 401
        assert not list((project / "data/events").glob("events-*.jsonl"))
        assert svc.get("/similar", item_id=7100).status_code == 404
