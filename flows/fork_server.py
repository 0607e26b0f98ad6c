"""A warm process that starts a run's reproduce processes by forking itself, not a new interpreter.

Every stage of a run, every putting back of a failed stage's outputs and the run's finish is a
process of its own (flows/reproduce.py, the leader of a new session so that run.stage_timeout_s and
a stopped run end it with everything it started). A new interpreter spends ~1 s of CPU importing
DVC (on a 2-core host) before work that takes 0.15-0.3 s, a dozen times a run. The flow starts this
server once (`ForkServer`, from its own process only); it imports what its requests run and then
forks for each request, so each reproduce process starts with DVC imported. It is what `python -m MODULE ARGS` would be in every respect the run depends on: the
leader of a new session, in the caller's working directory, with the caller's environment and
standard streams (passed as file descriptors over a Unix socket), its exit code reported back.

The server stays single-threaded (a fork copies only the forking thread: a lock another thread held
would stay held in every child). It ends when its caller closes the control socket or is gone.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

from flows.process_groups import still_running

# A request is one datagram: the module, its arguments, the working directory and the environment
_MAX_REQUEST = 1 << 20


class ForkServerGone(RuntimeError):
    """The server did not take the request (it failed to start, or ended): nothing was started."""


class Forked:
    """A process the server forked: what flows/process_groups.py's `stop_group` and the run's wait
    use of a `subprocess.Popen` (pid, poll, wait). Its exit code comes over `reply` from the server's
    process that waits for it (it is not this process's child)."""

    def __init__(self, pid: int, reply: socket.socket, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._reply = reply
        self._read = b""
        self._running = still_running(pid)

    def poll(self) -> int | None:
        return self._code(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._code(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def _code(self, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._reply], [], [], left)[0]:
                return None
            chunk = self._reply.recv(64)
            self._read += chunk
            if self._read.endswith(b"\n"):
                self.returncode = int(self._read)
            elif not chunk:      # the waiter was killed before it could say: wait for the process itself
                return self._gone(deadline)
        self._reply.close()
        return self.returncode

    def _gone(self, deadline: float | None) -> int | None:
        while self._running():
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.1)
        self.returncode = 1      # its exit code is lost with the waiter; the result file says how it went
        self._reply.close()
        return self.returncode


class ForkServer:
    """The server process, started with `preload` imported, in `root` (so `python -m` modules resolve
    as they would for a process started there: a project's own `flows/`)."""

    def __init__(self, root: Path, preload: Sequence[str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.owner = os.getpid()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "flows.fork_server", str(theirs.fileno()), str(os.getpid()), *preload],
            cwd=root, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._control = ours
        self._lock = threading.Lock()   # one request at a time on the control socket

    def start(self, module: str, args: list[str], cwd: Path) -> Forked:
        """Fork `python -m module *args` (`module.main(args)`, its return value the exit code) in cwd,
        with this process's environment and standard streams; ForkServerGone when the server did not
        take it (nothing started then)."""
        request = json.dumps({"module": module, "args": args, "cwd": str(cwd), "env": dict(os.environ)}).encode()
        if len(request) > _MAX_REQUEST:
            raise ForkServerGone(f"the request is {len(request)} bytes, over {_MAX_REQUEST}")
        mine, theirs = socket.socketpair()
        stdio = [_stream(fd) for fd in (0, 1, 2)]
        try:
            with self._lock:
                socket.send_fds(self._control, [request], [*stdio, theirs.fileno()])
        except OSError as exc:
            mine.close()
            raise ForkServerGone(f"the fork server is gone: {exc}") from exc
        finally:
            theirs.close()
            for fd in stdio:
                os.close(fd)
        line = b""
        while not line.endswith(b"\n"):
            chunk = mine.recv(64)
            if not chunk:
                mine.close()
                raise ForkServerGone("the fork server ended before it started the process")
            line += chunk
        return Forked(int(line), mine, [sys.executable, "-m", module, *args])

    def close(self) -> None:
        """End the server (the processes it started run on, each watched by its caller)."""
        self._control.close()
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _stream(fd: int) -> int:
    """A duplicate of this process's standard stream fd, or of /dev/null where it is closed."""
    try:
        return os.dup(fd)
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


# The servers this process started, by project root (a run holds its project's run lock, so one
# server per project serves the run's tasks in this process)
_SERVERS: dict[Path, ForkServer] = {}


@contextmanager
def serving(root: Path, preload: Sequence[str]) -> Iterator[None]:
    """Within it, `server_for(root)` is a server started now (it imports while the run gets ready);
    none when it cannot be started (the run's processes then start as new interpreters)."""
    try:
        server = ForkServer(root, preload)
    except OSError:
        server = None
    if server is None:
        yield
        return
    _SERVERS[root.resolve()] = server
    try:
        yield
    finally:
        _SERVERS.pop(root.resolve(), None)
        server.close()


def server_for(root: Path) -> ForkServer | None:
    """This process's server for root, if one is serving: a task on another process (a Dask or Ray
    worker, a child forked from this one) starts its processes itself."""
    server = _SERVERS.get(root.resolve())
    return server if server is not None and server.owner == os.getpid() else None


def _serve(control: socket.socket, caller: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the caller's group: the caller acts
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # each request's waiter is reaped by the kernel
    while True:
        if not select.select([control], [], [], 1.0)[0]:
            with suppress(ProcessLookupError):
                os.kill(caller, 0)
                continue
            return      # the caller was killed; a child it forked may hold the socket open
        try:
            message, fds, _, _ = socket.recv_fds(control, _MAX_REQUEST, 4)
        except OSError:
            return
        if not message:
            return      # the caller closed its end
        if os.fork() == 0:
            control.close()
            _wait_for(json.loads(message), fds)
        for fd in fds:
            os.close(fd)


def _wait_for(request: dict, fds: list[int]) -> NoReturn:
    """In a child of the server: fork the request's process, say its pid, wait, say its exit code."""
    ok = False
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        reply = socket.socket(fileno=fds[3])
        pid = os.fork()
        if pid == 0:
            reply.close()
            _run(request, fds[:3])
        for fd in fds[:3]:
            os.close(fd)
        reply.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        reply.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        ok = True
    finally:
        os._exit(0 if ok else 1)


def _run(request: dict, stdio: list[int]) -> NoReturn:
    """`python -m module args` (its `main(args)`, the exit code it returns), as the leader of a new session with the caller's streams, directory
    and environment; the process ends here with the module's exit code."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["module"], *request["args"]]
        code = importlib.import_module(request["module"]).main(request["args"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:   # noqa: BLE001 - what an interpreter would print, then its exit code 1
        traceback.print_exc()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with suppress(Exception):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    fd, caller, *modules = sys.argv[1:]
    for name in modules:
        importlib.import_module(name)
    _serve(socket.socket(fileno=int(fd)), int(caller))
