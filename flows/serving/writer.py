"""The service's writer process, and how the reading processes hand it their writes.

`towerflow serve-api` runs the writes (POST /items, POST /events, DELETE /items/{id}) in one
process of their own, the writer, and answers everything else in one or more reader processes
(flows/serving/workers.py). A write is Python work for its whole length (validating thousands of
rows, the item tower, building index points, Feast's push, fsync): in the process that answers
/recommend it held the GIL for most of a 5,000-item POST, and a read waited for it (p99 ~280 ms).
In its own process it takes a core of its own instead, and a reader only waits on a socket.

- The writer holds the live version's index itself (an embedded index belongs to one process) and
  does exactly what a one-process service did: sidecar first (durable), then its index.
- A reader forwards a write's checked body over a Unix socket (a private 0700 folder: only this
  user's processes reach it) and relays the answer as it is. After an accepted POST /items or
  DELETE, the reader brings its own index copy up to date from the sidecar before it answers, so
  a 200 still means "recommendable here"; the other readers' watchers pick it up within
  serve.reload_interval_s (flows/serving/state.py).
- A writer that does not answer (restarting after a crash) is a 503 with Retry-After.
"""
from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass
from pathlib import Path

from flows.errors import LockBusy

FORWARD_TIMEOUT_S = 600.0     # a write's own lock waits are bounded by serve.lock_wait_s; this is the backstop
RELAYED = ("content-type", "retry-after", "www-authenticate")
FORWARDED = ("host", "authorization", "content-type")


class WriterUnavailable(LockBusy):
    """The writer process is not answering (it is starting or restarting): 503, try again."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path_ = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path_)
        self.sock = sock


@dataclass(frozen=True)
class Relayed:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class WriterClient:
    """Forwards writes to the writer process listening on `socket_path` (blocking: call it from a
    handler thread, where the wait releases the GIL)."""

    socket_path: Path
    timeout_s: float = FORWARD_TIMEOUT_S

    def forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Relayed:
        conn = _UnixConnection(self.socket_path, self.timeout_s)
        try:
            try:
                conn.request(method, path, body=body or None,
                             headers={k: v for k, v in headers.items() if k in FORWARDED})
                answer = conn.getresponse()
                data = answer.read()
            except (ConnectionError, FileNotFoundError, socket.timeout, http.client.HTTPException) as exc:
                raise WriterUnavailable(f"the service's writer process is not answering ({type(exc).__name__}); "
                                        "try again", retry_after_s=1.0) from None
            kept = {k: v for k, v in answer.getheaders() if k.lower() in RELAYED}
            return Relayed(answer.status, kept, data)
        finally:
            conn.close()

    def ready(self, host: str) -> bool:
        """Whether the writer answers /healthz with its version loaded (`host`: a name of
        serve.allowed_hosts, which the writer checks like any reader)."""
        try:
            return self.forward("GET", "/healthz", b"", {"host": host}).status == 200
        except WriterUnavailable:
            return False
