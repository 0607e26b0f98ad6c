"""What the service checks before a request reaches a handler, and what its answers may say.

In order, each answered with `{"error": "..."}`:
1. Host: the Host header names one of serve.allowed_hosts (400). A web page the operator opens
   cannot then reach a loopback service through a DNS name its author controls (DNS rebinding).
2. Method: a path the service serves, asked with a method it does not serve there (PUT /recommend,
   OPTIONS), gets 405 with `Allow` listing the methods it does serve (RFC 9110), before the token
   or the body is looked at. Starlette's own 405 named only the first route of a path. HEAD is served
   wherever GET is (`curl -I /healthz`, a load balancer's probe): the GET's status and headers.
3. Token: with TOWERFLOW_API_TOKEN set, writes (POST /events, POST /items, DELETE /items/{id}) need
   `Authorization: Bearer <it>`; with TOWERFLOW_READ_TOKEN set, so do reads (the write token is
   accepted for reads too). /healthz stays open: load balancers probe it without credentials (401).
4. A POST body is `Content-Type: application/json` (415): a cross-site form or text/plain post,
   which a browser sends without asking, is refused before it is read.
5. The body is read chunk by chunk and refused past serve.max_body_bytes (413), never read whole
   first; then its nesting depth and the length of its numbers are bounded (400), so parsing it can
   neither recurse nor build huge integers.
Tokens come from the environment only (never params.yaml) and are compared in constant time.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np

from flows.errors import ConfigError

WRITE_TOKEN_ENV, READ_TOKEN_ENV = "TOWERFLOW_API_TOKEN", "TOWERFLOW_READ_TOKEN"
MIN_TOKEN_CHARS = 16
MAX_JSON_DEPTH = 16          # the deepest valid body: {"filter": {"year": {"gte": 1}}} is 3
MAX_NUMBER_CHARS = 64        # int64 has 19 digits; a 5000-digit number is an attack, not an id
OPEN_PATHS = frozenset({"/healthz"})
READ_POSTS = frozenset({"/recommend"})     # POST for a batch, but a read
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
BODY_KEY = "towerflow.body"   # the checked body, in the ASGI scope
INLINE_BYTES = 64 * 1024      # smaller bodies are checked on the event loop (a thread hop costs more)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_LONG_NUMBER = re.compile(rb"[-+0-9.eE]{%d,}" % (MAX_NUMBER_CHARS + 1))
_SECRET_IN_URL = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)[^@\s'\"]*@")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+(?P<name>[\w.@+-]*)")


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens the service accepts; None: that kind of request needs none."""

    write: str | None = None
    read: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Tokens":
        tokens = {}
        for key, name in (("write", WRITE_TOKEN_ENV), ("read", READ_TOKEN_ENV)):
            value = (env.get(name) or "").strip()
            if value and len(value) < MIN_TOKEN_CHARS:
                raise ConfigError(f"{name} is {len(value)} characters; use at least {MIN_TOKEN_CHARS} (e.g. "
                                  "python -c 'import secrets; print(secrets.token_urlsafe(32))')")
            tokens[key] = value or None
        return cls(**tokens)

    def needed(self, write: bool) -> tuple[str, ...]:
        """The tokens that admit a request: writes need the write token (the read token when only
        that one is set); reads accept either."""
        if write:
            return (self.write,) if self.write else ((self.read,) if self.read else ())
        return tuple(t for t in (self.read, self.write) if t) if self.read else ()


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False      # a name: it may resolve to any interface


def require_safe_bind(host: str, tokens: Tokens) -> None:
    """A service reachable from other machines must not take writes from anyone."""
    if not is_loopback(host) and tokens.write is None:
        raise ConfigError(f"--host {host} is reachable from other machines: set {WRITE_TOKEN_ENV} (a secret of at "
                          f"least {MIN_TOKEN_CHARS} characters) so that writes need it, or bind 127.0.0.1")


def mask_secrets(text: str) -> str:
    """scheme://user:password@host -> scheme://user:***@host (REDIS_URL, QDRANT_URL in messages)."""
    return _SECRET_IN_URL.sub(r"\g<head>***@", text)


class MaskSecrets(logging.Filter):
    """Masks URL passwords in the service log's messages (a failed Redis connection names its URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def public_message(text: str, root: Path | None = None) -> str:
    """An error message fit for an HTTP answer: secrets masked, paths under the project made
    relative, other absolute paths cut to their last part."""
    text = mask_secrets(text)
    if root is not None:
        text = text.replace(str(root).rstrip("/") + "/", "")
    return _ABSOLUTE_PATH.sub(lambda m: m.group("name") or "<path>", text)


def json_shape_error(body: bytes) -> str | None:
    """Why a JSON body is refused before parsing (too deep, a huge number), or None. Strings are
    blanked first, so brackets and digits inside them do not count."""
    blanked = _STRING.sub(b'""', body)
    bare = np.frombuffer(blanked, dtype=np.uint8)
    if bare.size:
        step = np.isin(bare, (ord("["), ord("{"))).astype(np.int32) - np.isin(bare, (ord("]"), ord("}")))
        depth = int(np.cumsum(step).max())
        if depth > MAX_JSON_DEPTH:
            return f"the request body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted"
    number = _LONG_NUMBER.search(blanked)
    if number:
        return (f"the request body holds a number of {len(number.group())} characters; at most "
                f"{MAX_NUMBER_CHARS} are accepted")
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def send_error(send: Send, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware applying the checks of the module doc, in that order."""

    def __init__(self, app: Any, tokens: Tokens, allowed_hosts: list[str], max_body_bytes: int,
                 relayed: frozenset[tuple[str, str]] = frozenset(),
                 methods: Mapping[str, frozenset[str]] | None = None):
        """relayed: (method, path) of bodies this process hands on unparsed to one that checks them
        again (a reader's writes, flows/serving/writer.py): their shape check (~45 ms of the GIL for
        a 10,000-event body) is left to that process. methods: path template (`/items/{item_id}`)
        -> the methods served there."""
        self.app, self.tokens, self.max_body_bytes = app, tokens, max_body_bytes
        self.relayed = relayed
        served = {path: frozenset(allowed | {"HEAD"} if "GET" in allowed else allowed)
                  for path, allowed in (methods or {}).items()}
        self.methods = [(_path_pattern(path), ", ".join(sorted(allowed)), allowed)
                        for path, allowed in served.items()]
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = frozenset(host_name(h) if not h.startswith("[") else h[1:-1].lower()
                                       for h in allowed_hosts)

    def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        host = _header(scope, b"host")
        if not self.any_host and (host is None or host_name(host) not in self.allowed_hosts):
            return 400, f"Host {host!r} is not one of serve.allowed_hosts", {}
        method, path = scope["method"], scope["path"]
        for pattern, listed, allowed in self.methods:
            if pattern.fullmatch(path):
                if method not in allowed:
                    return 405, f"{method} is not served at {path[:200]} (Allow: {listed})", {"Allow": listed}
                break
        if path not in OPEN_PATHS:
            needed = self.tokens.needed(write=method not in ("GET", "HEAD") and path not in READ_POSTS)
            if needed and not _bearer_matches(_header(scope, b"authorization"), needed):
                return 401, "missing or wrong bearer token (Authorization: Bearer <token>)", {
                    "WWW-Authenticate": "Bearer"}
        if method in BODY_METHODS:
            kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
                return 415, f"{method} bodies must be Content-Type: application/json (got {kind or 'none'!r})", {}
            length = _header(scope, b"content-length")
            if length is not None and length.isascii() and length.isdigit() and int(length) > self.max_body_bytes:
                return 413, f"the request body is {int(length)} bytes; serve.max_body_bytes is {self.max_body_bytes}", {}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await send_error(send, *refusal)
            return
        if scope["method"] == "HEAD" and self.methods:     # the routes are GET's: answered as one, no body
            scope, send = {**scope, "method": "GET"}, _headers_only(send)
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await send_error(send, 413, f"the request body exceeds serve.max_body_bytes ({self.max_body_bytes})")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # tens of ms for a large body: off the event loop, which keeps answering /healthz
        shape = (None if (scope["method"], scope["path"]) in self.relayed else
                 json_shape_error(body) if len(body) < INLINE_BYTES else
                 await anyio.to_thread.run_sync(json_shape_error, body))
        if shape is not None:
            await send_error(send, 400, shape)
            return
        scope[BODY_KEY] = body     # parsed by the handler's thread (flows/serving/api.py, json_body)
        await self.app(scope, _replay(body, receive), send)


def _headers_only(send: Send) -> Send:
    async def headers_only(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(message)
    return headers_only


def _path_pattern(template: str) -> re.Pattern[str]:
    """A route's path template as Starlette matches it: a `{name}` is one non-empty segment."""
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)))


def _bearer_matches(header: str | None, tokens: tuple[str, ...]) -> bool:
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    given_bytes = given.strip().encode()
    # Every token is compared, each in constant time: the answer's timing says nothing about them.
    return any([hmac.compare_digest(given_bytes, t.encode()) for t in tokens])


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def again() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return again
