"""`towerflow serve-api --workers 2`: a real supervisor, writer and two reader processes on a
loopback port over the tiny project's published bundle. Every reader answers; an item added or
removed through one of them reaches every reader within the reload interval; a publish and a
rollback switch every reader; a writer killed with -9 is started again and writes go on."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from tests.serving.test_api import known_users, run_publish

RELOAD_S = 0.2
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_api(project: Path, workers: int) -> Iterator[tuple[str, subprocess.Popen]]:
    params = project / "params.yaml"
    cfg = yaml.safe_load(params.read_text()) or {}
    cfg["serve"] = {**cfg.get("serve", {}), "reload_interval_s": RELOAD_S}
    params.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TOWERFLOW_API_TOKEN", None)
    log = project / "serve-api.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-api", "--port", str(port), "--workers",
                                 str(workers), "--params", str(params)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=project)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while "serving version" not in log.read_text():   # printed once the writer and every reader answer
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield url, proc
    finally:
        stopped_here = proc.poll() is None      # a test may have killed it itself
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"serve-api did not stop on SIGTERM: {log.read_text()[-3000:]}")
    # reached when the body raised nothing: a stop asked for is no process failure in the log, and
    # the exit code says it was stopped, as every towerflow command's does
    text = log.read_text()
    assert not stopped_here or proc.returncode == 128 + signal.SIGTERM, (proc.returncode, text[-3000:])
    assert "Traceback" not in text and not re.search(r"serve-api \w+ process \d+ failed", text), text[-3000:]


def by_process(url: str, path: str, params: dict[str, Any] | None = None, pids: int = 2,
               tries: int = 400) -> dict[int, httpx.Response]:
    """One answer from each of `pids` processes: a fresh connection per request (the kernel hands
    each to one of the readers), /version's pid saying which one answered."""
    seen: dict[int, httpx.Response] = {}
    for _ in range(tries):
        with httpx.Client(base_url=url, timeout=30) as client:
            pid = client.get("/version").json()["pid"]
            if pid not in seen:
                seen[pid] = client.get(path, params=params)   # same connection: the same process
        if len(seen) == pids:
            return seen
    raise AssertionError(f"only {len(seen)} of {pids} processes answered in {tries} connections")


def until_every_process(url: str, check: Callable[[dict[str, Any]], bool], timeout: float) -> float:
    """Seconds until /version satisfies `check` in both readers."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all(check(r.json()) for r in by_process(url, "/version").values()):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not every process got there within {timeout} s: "
                         f"{[r.json() for r in by_process(url, '/version').values()]}")


def test_two_workers_share_additions_removals_publish_and_rollback(project: Path) -> None:
    first = run_publish(project)["version"]
    user = known_users(project, 1)[0]
    with serve_api(project, workers=2) as (url, proc):
        answers = by_process(url, "/recommend", {"user_id": user, "k": 5})
        assert all(r.status_code == 200 and len(r.json()["items"]) == 5 for r in answers.values())
        versions = by_process(url, "/version")
        assert {r.json()["version"] for r in versions.values()} == {first}
        assert proc.pid not in versions                           # readers are children of the supervisor
        # each reader imported its libraries with the collector paused and froze them: its full
        # collections (each a stall of every request it holds) skip their few hundred thousand objects
        for _ in range(6):
            with httpx.Client(base_url=url, timeout=30) as client:     # a fresh connection: any reader
                scrape = client.get("/metrics").text
            frozen = re.search(r"^towerflow_gc_frozen_objects (\S+)$", scrape, re.M)
            assert frozen and float(frozen.group(1)) > 100_000, scrape[-2000:]
            assert re.search(r'^python_gc_collections_total\{generation="2"\}', scrape, re.M)
        items_before = {r.json()["items"] for r in versions.values()}
        assert len(items_before) == 1
        n = items_before.pop()

        # an item added through one reader: recommendable there at once, in the other within the interval
        added = httpx.post(url + "/items", json={"items": [{"item_id": 9001}]}, timeout=60)
        assert added.status_code == 200, added.text
        took = until_every_process(url, lambda v: v["items"] == n + 1, timeout=RELOAD_S + 5)
        assert all(r.status_code == 200 and r.json()["items"] for r in
                   by_process(url, "/similar", {"item_id": 9001, "k": 3}).values())
        everywhere = by_process(url, "/recommend", {"user_id": user, "k": n + 1, "exclude_seen": "false"})
        assert all(9001 in [i["item_id"] for i in r.json()["items"]] for r in everywhere.values())

        # what the writer refuses comes back as it answered (the reader leaves relayed bodies unparsed)
        deep = b'{"items": [' + b"[" * 40 + b"]" * 40 + b"]}"
        refused = httpx.post(url + "/items", content=deep, headers={"content-type": "application/json"})
        assert refused.status_code == 400 and "levels deep" in refused.json()["error"], refused.text
        taken = httpx.post(url + "/items", json={"items": [{"item_id": 9001}]}, timeout=60)
        assert taken.status_code == 409 and "9001" in taken.json()["error"], taken.text

        removed = httpx.delete(url + "/items/9001", timeout=60)
        assert removed.status_code == 200, removed.text
        until_every_process(url, lambda v: v["items"] == n, timeout=RELOAD_S + 5)
        assert all(r.status_code == 404 for r in by_process(url, "/similar", {"item_id": 9001}).values())

        # events go through the writer too, and every reader sees the user's new history
        item = int(pd.read_parquet(project / "data/training/items.parquet")["item_id"].iloc[0])
        event = httpx.post(url + "/events", json={"events": [{"user_id": user, "item_id": item}]}, timeout=60)
        assert event.status_code == 200 and event.json()["accepted"] == 1, event.text

        second = run_publish(project, model="eval")["version"]
        assert second != first
        until_every_process(url, lambda v: v["version"] == second, timeout=RELOAD_S + 30)
        from typer.testing import CliRunner

        from flows.cli import app
        result = CliRunner().invoke(app, ["index", "rollback", "--params", str(project / "params.yaml")])
        assert result.exit_code == 0, result.output
        until_every_process(url, lambda v: v["version"] == first, timeout=RELOAD_S + 30)
    assert took < RELOAD_S + 5


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_writer_is_restarted_and_the_supervisor_takes_its_children_along(project: Path) -> None:
    run_publish(project)
    with serve_api(project, workers=1) as (url, proc):
        readers = set(by_process(url, "/version", pids=1))
        (writer,) = set(_children(proc.pid)) - readers
        os.kill(writer, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while True:     # 503 with Retry-After while the writer restarts, then the write passes
            r = httpx.post(url + "/items", json={"items": [{"item_id": 9002}]}, timeout=60)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert time.monotonic() < deadline, "the writer did not come back"
            time.sleep(0.5)
        assert set(_children(proc.pid)) - readers - {writer}
        assert httpx.get(url + "/similar", params={"item_id": 9002}).status_code == 200
        children = _children(proc.pid)
        # the service's folder in the temporary directory (the writer's socket, the readers' marks)
        (folder,) = {p.parent for r in readers
                     for p in Path(tempfile.gettempdir()).glob(f"towerflow-serve-*/reader-{r}.ready")}
        proc.kill()                                  # kill -9 of the supervisor: no orphan holds the port
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(c) for c in children):
            assert time.monotonic() < deadline, f"children left running: {[c for c in children if _alive(c)]}"
            time.sleep(0.2)
        assert not folder.exists(), sorted(folder.iterdir())    # nothing left behind in /tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) is gone for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", [0])
def test_workers_must_be_positive(project: Path, workers: int) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    result = CliRunner().invoke(app, ["serve-api", "--workers", str(workers), "--params", str(project / "params.yaml")])
    assert result.exit_code != 0 and "--workers" in result.output


def test_the_sigterm_uvicorn_passes_on_after_its_graceful_stop_is_not_raised_again() -> None:
    """uvicorn finishes its requests on SIGTERM, then raises the signal again: a SystemExit raised then
    can land in a weakref callback and be printed as an ignored exception (a traceback in the log of a
    clean stop). Before uvicorn has taken a SIGTERM, it still ends the process."""
    import uvicorn

    from flows.serving.workers import _quiet_after_graceful_stop

    server = uvicorn.Server(uvicorn.Config(app=None))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        _quiet_after_graceful_stop(server)
        with pytest.raises(SystemExit) as stopped:
            signal.raise_signal(signal.SIGTERM)       # while starting: the process ends
        assert stopped.value.code == 128 + signal.SIGTERM
        server.should_exit = True                      # uvicorn took the SIGTERM and stopped gracefully
        signal.raise_signal(signal.SIGTERM)           # passed on: nothing raised
    finally:
        signal.signal(signal.SIGTERM, previous)
