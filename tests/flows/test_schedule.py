"""Scheduled runs against a real Prefect server started by the test (loopback, temporary home).

`towerflow schedule` registers the deployment, `towerflow serve` serves it, `prefect deployment run
--watch` triggers a run and waits; the run must complete and leave the stages' outputs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.project import make_project

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server at {url} not healthy after {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_server_home")
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, proc)
        yield url, home
    finally:
        _stop(proc)


def _env(url: str, home: Path) -> dict[str, str]:
    return dict(os.environ, PREFECT_API_URL=url, PREFECT_HOME=str(home),
                PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""))


def test_scheduled_deployment_runs_on_a_real_server(prefect_server, tmp_path, contract_source):
    url, home = prefect_server
    root = make_project(tmp_path / "proj", contract_source)
    env = _env(url, home)
    created = subprocess.run([str(BIN / "towerflow"), "schedule", "--name", "t", "--cron", "0 3 * * *",
                              "--until", "validate"], cwd=root, env=env, capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    assert "deployment towerflow/t" in created.stdout

    with urllib.request.urlopen(urllib.request.Request(
            f"{url}/deployments/name/towerflow/t", headers={"Accept": "application/json"})) as resp:
        registered = json.loads(resp.read())
    assert registered["parameters"]["root"] == str(root.resolve())
    assert registered["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

    server = subprocess.Popen([str(BIN / "towerflow"), "serve", "--name", "t"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        triggered = subprocess.run([str(BIN / "prefect"), "deployment", "run", "towerflow/t", "--watch",
                                    "--watch-timeout", "300"], cwd=root, env=env, capture_output=True,
                                   text=True, timeout=360)
    finally:
        _stop(server)
    out = triggered.stdout + triggered.stderr + "\n--- towerflow serve:\n" + server.stdout.read()
    assert triggered.returncode == 0, out
    assert "Completed" in out, out
    assert (root / "data/ingested/interactions.parquet").exists()
    assert json.loads((root / "reports/validation.json").read_text())["success"] is True
    assert not (root / "data/training").exists()          # --until validate: nothing after it ran


def test_bad_schedule_is_one_line(prefect_server, tmp_path, contract_source):
    url, home = prefect_server
    root = make_project(tmp_path / "proj", contract_source)
    for args, expected in ((["--cron", "not a cron"], "not a valid cron expression"),
                           (["--cron", "0 3 * * *", "--interval", "60"], "exactly one of --cron or --interval"),
                           (["--interval", "-5"], "positive number of seconds")):
        proc = subprocess.run([str(BIN / "towerflow"), "schedule", *args], cwd=root, env=_env(url, home),
                              capture_output=True, text=True)
        assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
