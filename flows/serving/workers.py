"""`towerflow serve-api [--workers N]`: one writer process and N reader processes on one port.

    supervisor (this process: binds the port, starts and restarts the others, nothing else)
    ├── writer    the live version with its own index; POST /items, POST /events, DELETE /items
    │             over a Unix socket in a private folder (flows/serving/writer.py)
    └── reader ×N each accepts on the shared listening socket (the kernel spreads connections),
                  with its own read-only copy of the live version's index; hands writes to the writer

Why processes: one Python process answers with one core at a time (the GIL), and a write's Python
work stalled the reads beside it. Every process watches LIVE and the additions sidecar every
serve.reload_interval_s (flows/serving/state.py), so a publish, a rollback, an item added or
removed through any reader (or `towerflow index add-items`) reaches all of them within that time;
the reader that took the write applies it before it answers. The bundle store's additions lock
(flows/locks.py) still orders writers across processes (the writer and the CLI).

The children are forked before anything heavy is loaded (no threads, no torch yet), so each loads
its own model, Feast handle and index. A child that dies is started again; when the supervisor
goes (even by kill -9), the children follow (PR_SET_PDEATHSIG on Linux, else they notice within
PARENT_POLL_S).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.errors import ConfigError, TowerflowError
from flows.serving.guard import Tokens, host_name, require_safe_bind
from flows.serving.discovery import announced
from flows.serving.writer import WriterClient

log = logging.getLogger("towerflow.serve")
# A write's leftover Python work in a reader (applying the sidecar to its index) hands the GIL to
# the event loop and the reads every 1 ms instead of 5 ms.
SWITCH_INTERVAL_S = 0.001
PARENT_POLL_S = 0.5
START_TIMEOUT_S = 300.0          # loading a version (model, Feast, index copy) on a loaded machine
STOP_TIMEOUT_S = 15.0
RESTART_PAUSE_S = 1.0            # between restarts of a child that keeps dying
WRITER_SOCKET = "writer.sock"


def _die_with(parent: int) -> None:
    """End this child when the supervisor ends, however it ends."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG: SIGTERM when the parent dies
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)   # uvicorn's handler: finish requests, then stop
        time.sleep(STOP_TIMEOUT_S)
        os._exit(1)
    threading.Thread(target=watch, name="towerflow-parent-watch", daemon=True).start()
    if os.getppid() != parent:                  # it went before the watch started
        os._exit(1)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _quiet_after_graceful_stop(server: Any) -> None:
    """uvicorn stops gracefully on SIGTERM, then raises the signal again with the handler it found. By
    then nothing is left to interrupt (the caller's `finally` runs next), and a SystemExit raised at
    that moment can land inside a weakref callback, where Python prints it as an ignored exception
    with a traceback (seen once in a stopped service's log). A SIGTERM before uvicorn took it still
    ends the process through its `finally`."""
    def handler(signum: int, frame: Any) -> None:
        if not server.should_exit:
            _exit_on_sigterm(signum, frame)
    signal.signal(signal.SIGTERM, handler)


# What a serving process imports before it loads a version: imported with the garbage collector
# paused and frozen (flows/environment.py import_frozen). Unfrozen, the ~370k objects of a loaded
# reader made every full collection a stall of 0.26-0.41 s on the tiny project (a request then took
# 280-430 ms against a p99 of 22 ms; 2 such collections in 3,000 requests), 57-86 ms frozen. A
# version's own objects (model, index, store) stay collectable: a reload frees the old one.
SERVICE_LIBRARIES = ("torch", "pandas", "pyarrow.parquet", "qdrant_client", "uvicorn", "flows.serving.api")


def _child_setup(threads: int) -> None:
    from flows.environment import import_frozen

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # While the service loads (seconds), SIGTERM ends the process through its `finally` (the index
    # closed), not on the spot as with Python's default; once uvicorn serves, _quiet_after_graceful_stop.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    import_frozen(SERVICE_LIBRARIES)
    import torch
    # Each process's per-request torch work is a small MLP and one matrix product: several
    # processes with a pool of threads each only fight over the cores.
    torch.set_num_threads(threads)


def run_writer(params: Any, root: Path, socket_path: Path) -> None:
    """The writer child: the whole service (it answers writes itself), on the Unix socket."""
    import uvicorn

    from flows.serving.api import build_service, server_config

    _child_setup(params.serve.threads)
    app, state = build_service(params, root)
    config = server_config(app, params.serve)
    config.host, config.port, config.uds = None, None, str(socket_path)
    server = uvicorn.Server(config)
    _quiet_after_graceful_stop(server)
    try:
        server.run()
    finally:
        state.stop()


def run_reader(params: Any, root: Path, sock: socket.socket, socket_path: Path) -> None:
    """A reader child: reads answered here, writes handed to the writer."""
    import uvicorn

    from flows.serving.api import build_service, server_config

    _child_setup(params.serve.threads)
    app, state = build_service(params, root, writer=WriterClient(socket_path))
    (socket_path.parent / f"reader-{os.getpid()}.ready").touch()   # loaded: the supervisor waits for every reader
    server = uvicorn.Server(server_config(app, params.serve))
    _quiet_after_graceful_stop(server)
    try:
        server.run(sockets=[sock])
    finally:
        state.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Starts the writer, then the readers; restarts any that exits; stops them all on a signal."""

    def __init__(self, params: Any, root: Path, host: str, port: int, workers: int):
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        self.params, self.root, self.workers = params, Path(root), workers
        self.sock = _bind(host, port)
        self.folder = Path(tempfile.mkdtemp(prefix="towerflow-serve-"))   # 0700: this user's processes only
        self.socket_path = self.folder / WRITER_SOCKET
        self.children: dict[int, str] = {}          # pid -> "writer" | "reader"
        self.stopping = False
        allowed = params.serve.allowed_hosts
        self.probe_host = "localhost" if "*" in allowed else host_name(allowed[0]) if not allowed[0].startswith(
            "[") else allowed[0]

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _fork(self, role: str) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _die_with(parent)
                if role == "writer":
                    self.sock.close()
                    run_writer(self.params, self.root, self.socket_path)
                else:
                    run_reader(self.params, self.root, self.sock, self.socket_path)
            except SystemExit as exc:
                # a stop asked for (SIGTERM before uvicorn serves: _exit_on_sigterm), not a failure: no
                # traceback in the service's log
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:   # the supervisor starts it again; the reason goes to the log
                log.exception("serve-api %s process %d failed", role, os.getpid())
                code = 1
            finally:
                if role == "writer" and os.getppid() != parent:
                    # the supervisor is gone without its clean-up (kill -9): the writer, whose socket
                    # the folder holds, removes it, or every such kill would leave one behind in /tmp
                    shutil.rmtree(self.folder, ignore_errors=True)
                logging.shutdown()
                os._exit(code)
        self.children[pid] = role
        return pid

    def start(self) -> None:
        """The writer first (it holds the original index and must be up for the readers' writes),
        then the readers; returns once every process answers."""
        self._fork("writer")
        self._wait_for(lambda: WriterClient(self.socket_path).ready(self.probe_host), "writer")
        for _ in range(self.workers):
            self._fork("reader")
        self._wait_for(self._readers_up, "reader")

    def _readers_up(self) -> bool:
        ready = {int(p.stem.split("-")[1]) for p in self.folder.glob("reader-*.ready")}
        return len(ready & set(self.children)) >= self.workers

    def _wait_for(self, ready: Callable[[], bool], role: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            self._reap(restart=False)
            if role not in self.children.values():
                raise TowerflowError(f"serve-api: the {role} process stopped while starting; see the messages above")
            if time.monotonic() > deadline:
                raise TowerflowError(f"serve-api: the {role} processes did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.2)

    def _reap(self, restart: bool) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            role = self.children.pop(pid, None)
            if role is None:
                continue
            if restart and not self.stopping:
                log.error("serve-api %s process %d exited (%s); starting another", role, pid,
                          os.waitstatus_to_exitcode(status))
                time.sleep(RESTART_PAUSE_S)
                self._fork(role)

    def run(self) -> None:
        """Supervise until SIGINT or SIGTERM, then stop the children (they finish their requests) and
        exit 128 + the signal, as every towerflow command stopped by one does (130 / 143): the code
        no longer depends on whether the signal came before this loop or in it."""
        received: list[int] = []

        def stop(signum: int, frame: Any) -> None:
            received.append(signum)
            self.stopping = True
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping:
                self._reap(restart=True)
                time.sleep(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()
        if received:
            raise SystemExit(128 + received[0])

    def stop(self) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.children and time.monotonic() < deadline:
            self._reap(restart=False)
            time.sleep(0.05)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children.clear()
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def serve(params: Any, root: Path, host: str, port: int, workers: int = 1, announce: Any = print) -> None:
    """Run the service until interrupted. A non-loopback --host needs the write token."""
    from flows.serving.guard import MaskSecrets
    from flows.serving.store import BundleStore

    require_safe_bind(host, Tokens.from_env(os.environ))
    log.addFilter(MaskSecrets())
    BundleStore(params.paths.resolved(root).published).live_dir()    # nothing published: say so now
    supervisor = Supervisor(params, root, host, port, workers)
    try:
        supervisor.start()
    except BaseException:
        supervisor.stop()
        raise
    announce(f"serving version {BundleStore(params.paths.resolved(root).published).live()} at http://{host}:{port} "
             f"with {workers} reader process{'es' if workers > 1 else ''} and a writer "
             "(GET /recommend, /similar, /version, /healthz, /metrics, /openapi.json; POST /recommend, /events, "
             "/items; DELETE /items/{id})")
    if host not in params.serve.allowed_hosts and "*" not in params.serve.allowed_hosts:
        announce(f"note: requests must name one of serve.allowed_hosts ({', '.join(params.serve.allowed_hosts)}) "
                 "in their Host header; add the name clients use to reach this service")
    # advertised to `towerflow recommend` of this project, which then asks the warm readers
    with announced(root, host, port, params.paths.resolved(root).published):
        supervisor.run()
