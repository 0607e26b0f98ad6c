"""Where a running service of this project can be found, so a one-shot `towerflow recommend` asks it
instead of loading a bundle (the load is ~10 s cold: `import feast` alone is ~7 s; the answer from a
warm service takes milliseconds).

`towerflow serve-api` writes `.towerflow/services/<pid>.json` (its URL and the published store it
serves) while it runs and removes it when it stops. A reader trusts a file only if its process is alive,
it serves the same published store, and `GET /version` names the version that is live now: a service
that has not reloaded a new publish yet, one of another project, or a stale file after a kill -9 is
skipped and the caller loads the bundle itself. Standard library only: this runs before any heavy
import.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SERVICES_DIR = Path(".towerflow") / "services"
# A warm service answers /version in a few ms; a busy or wedged one must not make the CLI slower
# than loading the bundle itself.
PROBE_TIMEOUT_S = 0.5
ANSWER_TIMEOUT_S = 30.0
# What a service bound to every interface is reached at from this machine.
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def _url(host: str, port: int) -> str:
    host = WILDCARD_HOSTS.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def announced(root: Path, host: str, port: int, published: Path) -> Iterator[Path]:
    """Advertise a service for the length of the block (its file is removed on the way out)."""
    folder = Path(root) / SERVICES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "url": _url(host, port),
                               "published": str(Path(published).resolve())}))
    os.replace(tmp, path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to use
        return False
    return True


def _request(url: str, token: str | None, body: Any = None, timeout: float = PROBE_TIMEOUT_S) -> Any:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback URL we wrote)
        return json.loads(response.read())


class Service:
    """A running service found for this project's live version."""

    def __init__(self, url: str, token: str | None):
        self.url, self.token = url, token

    def recommend(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /recommend; raises OSError/ValueError/urllib errors when the service cannot answer."""
        return _request(f"{self.url}/recommend", self.token, body, timeout=ANSWER_TIMEOUT_S)


def find_service(root: Path, published: Path, live_version: str, env: dict[str, str] | None = None
                 ) -> Service | None:
    """A running service of `root` that serves `live_version` from `published`, or None."""
    folder = Path(root) / SERVICES_DIR
    if not folder.is_dir():
        return None
    env = os.environ if env is None else env
    token = env.get("TOWERFLOW_READ_TOKEN") or None
    want = str(Path(published).resolve())
    for path in sorted(folder.glob("*.json")):
        try:
            info = json.loads(path.read_text())
            if info.get("published") != want or not _alive(int(info["pid"])):
                continue
            if _request(f"{info['url']}/version", token).get("version") == live_version:
                return Service(str(info["url"]), token)
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
            continue  # a torn file, a refused connection, a 401/503: not this one
    return None
