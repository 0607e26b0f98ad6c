"""The run's fork server (flows/fork_server.py): what it starts behaves as `python -m MODULE ARGS` would
for the run (a session of its own, the caller's directory, environment and streams, its exit code, a
child's exit code seen), and the server does not outlive its caller."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.fork_server import ForkServer, ForkServerGone

TARGET = """
import os, subprocess, sys, time

def main(args):
    print("ids", os.getpid(), os.getpgid(0), os.getsid(0), "cwd", os.getcwd(), "x", os.environ.get("TF_FORK_X"),
          flush=True)
    print("on stderr", file=sys.stderr, flush=True)
    if args[0] == "sleep":
        time.sleep(float(args[1]))
    if args[0] == "raise":
        raise ValueError("what the stage said")
    if args[0] == "child":      # a stage's command failing, as DVC sees it
        return subprocess.run(["sh", "-c", "exit 5"]).returncode
    return int(args[0])
"""


@pytest.fixture()
def server(tmp_path):
    (tmp_path / "forked_target.py").write_text(TARGET)
    server = ForkServer(tmp_path, ["forked_target"])
    yield server
    server.close()


def test_a_forked_process_leads_its_own_session_in_the_callers_directory_environment_and_streams(
        server, tmp_path, capfd, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("TF_FORK_X", "set after the server started")
    proc = server.start("forked_target", ["7"], work)
    assert proc.wait(timeout=30) == 7 and proc.poll() == 7
    out, err = capfd.readouterr()
    assert f"ids {proc.pid} {proc.pid} {proc.pid} cwd {work} x set after the server started" in out
    assert "on stderr" in err
    assert proc.pid not in {c.pid for c in psutil.Process().children(recursive=True)}


def test_exit_codes_an_exception_and_a_childs_exit_code_come_through(server, tmp_path, capfd):
    assert server.start("forked_target", ["0"], tmp_path).wait(timeout=30) == 0
    assert server.start("forked_target", ["raise"], tmp_path).wait(timeout=30) == 1
    assert "ValueError: what the stage said" in capfd.readouterr().err
    # the server ignores SIGCHLD: a child of the forked process that did too would be reaped by the
    # kernel, and subprocess would report 0 for any exit code (a failed stage taken for a success)
    assert server.start("forked_target", ["child"], tmp_path).wait(timeout=30) == 5


def test_a_wait_times_out_and_a_stopped_group_reports_its_signal(server, tmp_path):
    proc = server.start("forked_target", ["sleep", "60"], tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM


def test_a_closed_server_takes_nothing(server, tmp_path):
    server.close()
    with pytest.raises(ForkServerGone):
        server.start("forked_target", ["0"], tmp_path)


CALLER = """
import sys, time
from pathlib import Path
from flows.fork_server import ForkServer
server = ForkServer(Path(sys.argv[1]), [])
print(server._proc.pid, flush=True)
time.sleep(600)
"""


def test_the_server_ends_when_its_caller_is_killed(tmp_path):
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(caller.stdout.readline())
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 10
        while _running(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(server_pid), "the fork server outlived its caller"
    finally:
        if caller.poll() is None:
            caller.kill()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_server_that_failed_to_start_takes_nothing(tmp_path, capfd):
    """The run then starts its processes the plain way (flows/pipeline.py `_start_reproduce`)."""
    server = ForkServer(tmp_path, ["no_such_module_for_the_fork_server"])
    try:
        with pytest.raises(ForkServerGone):
            server.start("forked_target", ["0"], tmp_path)
        assert "No module named 'no_such_module_for_the_fork_server'" in capfd.readouterr().err
    finally:
        server.close()


def test_a_process_whose_waiter_was_killed_is_waited_for_by_its_pid(server, tmp_path):
    """Its exit code is lost with the server's process that waited for it: the run still waits until
    it has ended (then reads the outcome it wrote, flows/pipeline.py), never before."""
    proc = server.start("forked_target", ["sleep", "60"], tmp_path)
    os.kill(psutil.Process(proc.pid).ppid(), signal.SIGKILL)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 1


def test_a_server_that_cannot_be_started_serves_nothing(tmp_path, monkeypatch):
    from flows import fork_server

    def refused(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - e.g. out of processes (EAGAIN)
        raise BlockingIOError("Resource temporarily unavailable")

    monkeypatch.setattr(fork_server.subprocess, "Popen", refused)
    with fork_server.serving(tmp_path, []):
        assert fork_server.server_for(tmp_path) is None
