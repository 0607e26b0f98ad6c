"""Scheduled runs against a real Prefect server started by the test (loopback, temporary home).

`towerflow schedule` registers two deployments of one project (one with its own --set overrides),
`towerflow serve` serves both, the test triggers both at once through the API; both runs must
complete, one after the other, each with its deployment's overrides, and leave the stages' outputs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.project import make_project

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first

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


def _api(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method="GET" if body is None else "POST",
                                     headers={"Accept": "application/json", "Content-Type": "application/json"})
    # a busy server (its SQLite database locked by a run's writes) answers 503: Prefect's own client
    # retries those, so does this helper (seen with three test workers on two cores)
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 5:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _schedule(root: Path, env: dict[str, str], *args: str) -> str:
    created = subprocess.run([str(BIN / "towerflow"), "schedule", *args], cwd=root, env=env,
                             capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    return created.stdout


def _wait_finished(url: str, run_ids: list[str], timeout: float = 420) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [_api(url, f"/flow_runs/{run_id}") for run_id in run_ids]
        if all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"flow runs not finished after {timeout}s: {[r['state_type'] for r in runs]}")


def test_two_deployments_with_their_own_overrides_take_turns_on_a_real_server(prefect_server, tmp_path,
                                                                             contract_source):
    """A nightly full deployment and an hourly one with --set overrides, served by one process and
    triggered together: both complete, one after the other (the run lock), each with its overrides,
    and params.yaml is never written."""
    url, home = prefect_server
    root = make_project(tmp_path / "proj", contract_source)
    params_before = (root / "params.yaml").read_bytes()
    env = _env(url, home)
    assert "deployment towerflow/nightly" in _schedule(root, env, "--name", "nightly", "--cron", "0 3 * * *",
                                                        "--until", "ingest")
    out = _schedule(root, env, "--name", "hourly", "--cron", "30 * * * *", "--until", "ingest",
                    "--set", "train.update=finetune", "--set", "data.max_users=120")
    assert "with train.update=finetune, data.max_users=120" in out

    nightly = _api(url, "/deployments/name/towerflow/nightly")
    hourly = _api(url, "/deployments/name/towerflow/hourly")
    assert nightly["parameters"]["root"] == hourly["parameters"]["root"] == str(root.resolve())
    assert "overrides" not in nightly["parameters"]
    assert hourly["parameters"]["overrides"] == ["train.update=finetune", "data.max_users=120"]
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

    temp = tmp_path / "serve_temp"      # the serve process's temp folder (and its flow runs')
    temp.mkdir()
    server = subprocess.Popen([str(BIN / "towerflow"), "serve", "--name", "nightly", "--name", "hourly"],
                              cwd=root, env=dict(env, TMPDIR=str(temp)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        run_ids = [_api(url, f"/deployments/{d['id']}/create_flow_run", {})["id"] for d in (nightly, hourly)]
        runs = _wait_finished(url, run_ids)
        # stopped as a service manager stops it: Prefect's Runner left runner_storage/<uuid> behind
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        _stop(server)
    log = server.stdout.read()
    assert not list(temp.iterdir()), (list(temp.rglob("*")), log)
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], log
    first, second = sorted(runs, key=lambda r: min(t["start_time"] for t in _tasks(url, r)))
    # --until ingest (validate would add ~10 s a run of library start-up and test nothing more here)
    assert (root / "data/ingested/interactions.parquet").exists() and not (root / "reports/validation.json").exists()
    assert (root / "params.yaml").read_bytes() == params_before
    # dvc.lock records the run that ended last, with its deployment's overrides (or none)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    data = lock["stages"]["ingest"]["params"]["params.yaml"]["data"]
    last = max(runs, key=lambda r: r["end_time"])
    assert data["max_users"] == (120 if last["deployment_id"] == hourly["id"] else None), log
    # the later run waited for the lock: its first stage started after the first run's last task ended
    assert max(t["end_time"] for t in _tasks(url, first)) <= min(t["start_time"] for t in _tasks(url, second)), log


def _tasks(url: str, flow_run: dict) -> list[dict]:
    """The task runs (stages, push) of a flow run: all of them run while it holds the run lock."""
    tasks = _api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert tasks and all(t["start_time"] and t["end_time"] for t in tasks), tasks
    return tasks


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
