"""Published bundles: everything serving needs, one immutable folder per version, and a pointer.

    <published>/versions/<version>/     model/ (model.pt, encoder.json, model.json), schema.json,
                                        item_vectors.parquet, items.parquet, index/, bundle.json
    <published>/versions/.partial-<version>-<pid>/   a bundle being built
    <published>/LIVE                    {"version": ...}: the one serving reads
    <published>/history.jsonl           one line per publish / rollback: who, when, from, to, why
    <published>/.lock                   held (flock) by a publish or rollback; gone with its process

A bundle is built under a .partial name, fsynced, verified, and renamed into place; only then is
LIVE replaced (tmp + fsync + os.replace). A process killed at any point leaves the old LIVE and, at
worst, a .partial folder that the next publish removes. Serving never reads the training outputs,
so a bad training run cannot take the live recommendations down.
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.errors import PublishError, TowerflowError

MODEL_FILES = ("model.pt", "encoder.json", "model.json")
BUNDLE_JSON = "bundle.json"
PARTIAL_JSON = "partial.json"     # what a partial build created outside its folder (a server collection)
PARTIAL = re.compile(r"^\.partial-(?P<version>.+)-(?P<pid>\d+)$")


class NothingPublished(TowerflowError):
    """No live bundle yet."""


def model_digest(model_dir: Path) -> str:
    """Hash of the model files: which model a bundle serves (shown by `towerflow index list`)."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        path = model_dir / name
        if path.exists():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def version_name(digest: str, now: datetime | None = None) -> str:
    """`<utc yyyymmddTHHMMSS>-<8 hex of the content digest>`: sorts by time, names the content."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}-{digest[:8]}"


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under root to disk, so a rename of root publishes durable data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a torn one, even across a crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


class BundleStore:
    """The published folder: complete versions, the LIVE pointer, history, pruning."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.live_file = self.root / "LIVE"
        self.history_file = self.root / "history.jsonl"

    # --- reading ----------------------------------------------------------------------------------
    def live(self) -> str | None:
        if not self.live_file.is_file():
            return None
        return json.loads(self.live_file.read_text())["version"]

    def live_dir(self) -> Path:
        version = self.live()
        if version is None:
            raise NothingPublished(f"{self.live_file} not found: nothing is published yet; run the publish "
                                   "stage (`towerflow run`)")
        return self.versions / version

    def complete(self) -> list[str]:
        """Complete versions, oldest first (by created_at: names have one-second resolution)."""
        if not self.versions.is_dir():
            return []
        names = [p.name for p in self.versions.iterdir() if not p.name.startswith(".") and (p / BUNDLE_JSON).is_file()]
        return sorted(names, key=lambda v: (str(self.meta(v).get("created_at", "")), v))

    def meta(self, version: str) -> dict[str, Any]:
        path = self.versions / version / BUNDLE_JSON
        if not path.is_file():
            raise PublishError(f"unknown version '{version}'; available: {self._available()}")
        return json.loads(path.read_text())

    def find_digest(self, digest: str) -> str | None:
        """The newest complete version with this content, if any."""
        return next((v for v in reversed(self.complete()) if self.meta(v).get("digest") == digest), None)

    def history(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        return [json.loads(line) for line in self.history_file.read_text().splitlines() if line.strip()]

    def rolled_back_from(self, version: str) -> dict[str, Any] | None:
        """The rollback that took `version` off live, unless it was made live again since."""
        for entry in reversed(self.history()):
            if entry.get("to") == version:
                return None
            if entry.get("action") == "rollback" and entry.get("from") == version:
                return entry
        return None

    def _available(self) -> str:
        live = self.live()
        names = [f"{v} (live)" if v == live else v for v in self.complete()]
        return ", ".join(names) or "none"

    # --- writing (under `locked`) -----------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """One publish or rollback at a time. flock dies with its process, so a kill never
        leaves a stale lock."""
        self.versions.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PublishError(f"{self.root}: another publish or rollback is running; try again when "
                                   "it has finished") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def partial(self, version: str, created: dict[str, Any] | None = None) -> Path:
        """A fresh build folder; `created` records what the build makes outside it (cleanup)."""
        path = self.versions / f".partial-{version}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        (path / PARTIAL_JSON).write_text(json.dumps(created or {}))
        return path

    def promote(self, partial: Path, version: str) -> Path:
        """Make a verified build a complete version: fsync it all, then one rename."""
        (partial / PARTIAL_JSON).unlink(missing_ok=True)
        fsync_tree(partial)
        final = self.versions / version
        os.rename(partial, final)
        _fsync_dir(self.versions)
        return final

    def switch(self, version: str, action: str, reason: str) -> str | None:
        """Make `version` live (its server alias first, then LIVE) and record it; returns the old one."""
        previous = self.live()
        meta = self.meta(version)
        if meta.get("backend") == "qdrant-server":
            from flows.serving.index.qdrant_server import server_client, switch_alias
            client = server_client()
            try:
                switch_alias(client, meta["alias"], meta["collection"])
            finally:
                client.close()
        write_atomic(self.live_file, json.dumps({"version": version}) + "\n")
        self._record(action, previous, version, reason)
        return previous

    def _record(self, action: str, previous: str | None, version: str, reason: str) -> None:
        entry = {"action": action, "from": previous, "to": version, "who": _user(),
                 "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason}
        with open(self.history_file, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def prune(self, keep: int) -> list[str]:
        """Delete complete versions beyond the newest `keep` (the live one always stays and counts)."""
        live = self.live()
        others = [v for v in reversed(self.complete()) if v != live]
        doomed = others[max(0, keep - (1 if live else 0)):]
        for version in doomed:
            _drop_outside(self.meta(version))
            shutil.rmtree(self.versions / version)
        return doomed

    def clean_partials(self) -> list[str]:
        """Remove builds left by killed runs (their process is gone); a running one is kept."""
        removed = []
        for path in sorted(self.versions.glob(".partial-*")) if self.versions.is_dir() else []:
            m = PARTIAL.match(path.name)
            if m is None or (_pid_alive(int(m["pid"])) and int(m["pid"]) != os.getpid()):
                continue
            created = path / PARTIAL_JSON
            if created.is_file():
                _drop_outside(json.loads(created.read_text() or "{}"))
            shutil.rmtree(path)
            removed.append(path.name)
        return removed


def _drop_outside(meta: dict[str, Any]) -> None:
    """A version's storage outside its folder: the collection on a Qdrant server."""
    if meta.get("backend") != "qdrant-server" or not meta.get("collection"):
        return
    from flows.serving.index.qdrant_server import drop_collection, server_client, server_url
    if server_url() is None:   # cannot reach it: the collection stays (listed by the server)
        return
    client = server_client()
    try:
        drop_collection(client, meta["collection"])
    finally:
        client.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):   # no passwd entry (containers)
        return str(os.getuid())


def list_versions(store: BundleStore) -> list[dict[str, Any]]:
    """One row per complete version, oldest first: what `towerflow index list` prints."""
    live = store.live()
    rows = []
    for version in store.complete():
        meta = store.meta(version)
        rows.append({"version": version, "live": version == live, "count": meta.get("count"),
                     "model_digest": meta.get("model_digest"), "backend": meta.get("backend"),
                     "created_at": meta.get("created_at")})
    return rows


def rollback(store: BundleStore, to: str | None = None, reason: str = "") -> tuple[str, str]:
    """Make an earlier complete version live; default: the one that was live before the live
    one was published (bundle.json `previous`). Returns (from, to)."""
    with store.locked():
        live = store.live()
        if live is None:
            raise NothingPublished(f"{store.live_file} not found: nothing is published, nothing to roll back")
        target = to if to is not None else store.meta(live).get("previous")
        if target is None:
            raise PublishError(f"'{live}' has no earlier version to roll back to; available: {store._available()}")
        if target not in store.complete():
            what = "unknown version" if to is not None else f"the version live before '{live}' is no longer kept:"
            raise PublishError(f"{what} '{target}'; available: {store._available()}")
        if target == live:
            raise PublishError(f"'{target}' is already live")
        store.switch(target, "rollback", reason or "rollback")
        return live, target
