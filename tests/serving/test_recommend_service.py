"""`towerflow recommend` answers through a running `serve-api` of the project (issue 23: a one-shot
answer in well under the ~10 s of loading a bundle), and only when that service serves the live
version of the same store; otherwise it loads the bundle itself. The service is a real `serve-api`
process on a loopback port."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.serving.discovery import SERVICES_DIR, announced, find_service
from flows.serving.store import BundleStore
from tests.serving.test_api import known_users, run_publish

REPO = Path(__file__).resolve().parents[2]

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _recommend(project: Path, *args: str) -> tuple[str, str]:
    result = CliRunner().invoke(app, ["recommend", *args, "--params", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def _rows(csv_text: str) -> list[tuple[str, str, str]]:
    """(user, item, rank) of each answer row; scores are compared apart (the service rounds them)."""
    lines = csv_text.strip().splitlines()
    assert lines[0] == "user_id,item_id,rank,score,cold_start"
    return [tuple(line.split(",")[:3]) for line in lines[1:]]


@pytest.fixture
def served(project: Path):  # noqa: ANN201
    run_publish(project)
    port = _free_port()
    env = {**os.environ, "TOWERFLOW_API_TOKEN": "", "TOWERFLOW_READ_TOKEN": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-api", "--port", str(port), "--params",
                             str(project / "params.yaml")], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                # ready, and advertised (the supervisor advertises once every reader has loaded)
                if (httpx.get(f"{url}/healthz", timeout=1).status_code == 200
                        and list((project / SERVICES_DIR).glob("*.json"))):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve-api did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_recommend_is_answered_by_the_running_service_with_the_local_answer(project: Path, served) -> None:
    url, proc = served
    users = known_users(project, 3)
    (project / "users.txt").write_text("user_id\n" + "\n".join(map(str, users)) + "\n")
    via_service, note = _recommend(project, "--users-file", str(project / "users.txt"), "--k", "5")
    assert f"answered by the running service at {url}" in note
    local, local_note = _recommend(project, "--users-file", str(project / "users.txt"), "--k", "5", "--local")
    assert "running service" not in local_note
    assert _rows(via_service) == _rows(local) and len(_rows(local)) == 15
    # the advertisement disappears with the service: the next call loads the bundle itself
    proc.terminate()
    proc.wait(timeout=30)
    assert not list((project / SERVICES_DIR).glob("*.json"))
    again, again_note = _recommend(project, "--users-file", str(project / "users.txt"), "--k", "5")
    assert "running service" not in again_note and _rows(again) == _rows(local)


def test_only_a_live_service_of_this_store_serving_the_live_version_is_used(project: Path, served,
                                                                           tmp_path: Path) -> None:
    url, _ = served
    published = project / "artifacts/published"
    live = BundleStore(published).live()
    port = int(url.rsplit(":", 1)[1])
    found = find_service(project, published, live, env={})
    assert found is not None and found.url == url
    assert find_service(project, published, "some-other-version", env={}) is None   # not reloaded yet
    assert find_service(project, tmp_path / "elsewhere", live, env={}) is None      # another store
    assert find_service(project, published, live, env={"TOWERFLOW_READ_TOKEN": "x"}) is not None  # no read token set
    # a file left by a killed service (its pid is gone) is skipped, even at a port that answers
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for path in (project / SERVICES_DIR).glob("*.json"):
        info = json.loads(path.read_text())
        path.write_text(json.dumps({**info, "pid": dead.pid}))
    assert find_service(project, published, live, env={}) is None
    with announced(project, "0.0.0.0", port, published):   # a wildcard bind is reached on loopback
        assert find_service(project, published, live, env={}).url == url
