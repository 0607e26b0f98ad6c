"""The service's warm state: the live Recommender, loaded once, and its hot reload.

A watcher thread looks at `<published>/LIVE` every serve.reload_interval_s. When a publish or a
rollback names another version, the new bundle is loaded beside the old one (model, index, Feast
handle, added items synced), and only then is the reference swapped, under a lock, in one
assignment: a request is answered entirely by the version it started with, never by a half-loaded
one. The old version is closed when its last in-flight request finishes (a reference count), so
nothing is dropped. A version that fails to load leaves the current one serving (reported by
/healthz and the reload metric) and is retried after RETRY_AFTER_S.

The watcher also notices:
- a finished materialization (`materialized.json` rewritten): a full one replaced `online.db`, whose
  old file the open SQLite handle would keep reading, so the version goes on with a fresh Feast
  handle. Only once it has finished: during a rebuild the old file still answers for everyone;
- items added by another process (`towerflow index add-items` while the service holds the index):
  they are upserted from the bundle's sidecar (flows/serving/items.py).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from features.refresh import STATE_FILE as MATERIALIZED   # written when a materialization succeeded
from flows.errors import TowerflowError
from flows.errors import LockBusy
from flows.serving.items import sync_additions
from flows.serving.recommend import Recommender
from flows.serving.store import BundleStore, catalog_ids, sidecar_signature

log = logging.getLogger("towerflow.serve")
RETRY_AFTER_S = 5.0

Loader = Callable[[Path, Path, Path], Recommender]


@dataclass
class Served:
    """One loaded version and what requests need beside it. `lock` serializes the use of its
    index and Feast handle between requests and the watcher (item upserts, a store swap)."""

    rec: Recommender
    known_items: set[Any]
    loaded_at: str
    sidecar: tuple[str, ...]
    materialized: int | None      # mtime_ns of <feast>/materialized.json when the store was opened
    refs: int = 0
    retired: bool = False
    events_store: Any = None      # a second online-store handle for pushes (own SQLite connection)
    lock: threading.RLock = field(default_factory=threading.RLock)
    syncing: threading.Lock = field(default_factory=threading.Lock)   # one sidecar sync at a time

    @property
    def version(self) -> str:
        return self.rec.version


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


class LiveState:
    """The live version for a long-running process; `use()` lends it to one request."""

    def __init__(self, published_dir: Path, feast_dir: Path, features_dir: Path, interval_s: float = 1.0,
                 on_change: Callable[["Served"], None] | None = None, loader: Loader | None = None,
                 reader: bool = False):
        """reader: a reader process of a service whose writes run in a writer process
        (flows/serving/writer.py): its embedded index is a private copy, and it only applies the
        sidecar, never writes it."""
        self.store = BundleStore(published_dir)
        self.reader = reader
        self.feast_dir, self.features_dir = Path(feast_dir), Path(features_dir)
        self.interval_s = interval_s
        self.on_change = on_change
        self.loader = loader or (partial(Recommender.load, private=True) if reader else Recommender.load)
        self._lock = threading.Lock()
        self._served: Served | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._failed: tuple[str, float] | None = None
        self.reloads = 0

    # --- loading --------------------------------------------------------------------------------
    def _load(self, version: str) -> Served:
        bundle = self.store.version_dir(version)
        rec = self.loader(bundle, self.feast_dir, self.features_dir)
        try:
            known = catalog_ids(bundle)
            sync_additions(rec, self.store.root, known, reader=self.reader)
        except BaseException:
            rec.close()
            raise
        return Served(rec, known, datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      sidecar_signature(bundle), _mtime(self.feast_dir / MATERIALIZED))

    def start(self, watch: bool = True) -> None:
        """Load the live version (raises if nothing is published) and start the watcher."""
        self._served = self._load(self.store.live_dir().name)
        if self.on_change:
            self.on_change(self._served)
        if watch:
            self._thread = threading.Thread(target=self._watch, name="towerflow-live-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            served, self._served = self._served, None
        if served is not None:
            self._retire(served)

    # --- requests -------------------------------------------------------------------------------
    @contextmanager
    def use(self, wait_s: float | None = None) -> Iterator[Served]:
        """The live version for one request, with its lock; it stays open until the request is
        done. Waiting longer than wait_s for the lock (a write holds it) raises LockBusy (the service answers 503 with Retry-After)."""
        with self.borrow() as served:
            if not served.lock.acquire(timeout=-1 if wait_s is None else wait_s):
                raise LockBusy(f"the live version has been busy for {wait_s:g} s (a write in progress); "
                               "try again")
            try:
                yield served
            finally:
                served.lock.release()

    @contextmanager
    def borrow(self) -> Iterator[Served]:
        """The live version, kept open but not locked: for a write that takes `served.lock` only
        around each of its index or online-store steps, so reads go on between them."""
        with self._lock:
            served = self._served
            if served is None:
                raise TowerflowError("the service is not loaded")
            served.refs += 1
        try:
            yield served
        finally:
            with self._lock:
                served.refs -= 1
                close = served.retired and served.refs == 0
            if close:
                served.rec.close()

    @property
    def served(self) -> Served | None:
        return self._served

    def events_store(self, served: Served) -> Any:
        """The online-store handle pushes go through, opened once per version and store: its own
        SQLite connection, so a push of 10,000 events does not hold the one requests read with."""
        store = served.events_store
        if store is None:    # opened outside the lock that every request takes (~0.1 s)
            from features.store import open_store
            store = open_store(self.feast_dir, self.features_dir, offline=None)
            with self._lock:
                served.events_store = store = served.events_store or store
        return store

    # --- watching -------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:   # the watcher must outlive any one failure
                log.exception("live check failed")
                # /healthz shows it: the kind of failure, never its text (paths, URLs: see the log)
                self.last_error = f"the live check failed ({type(exc).__name__}); see the service log"

    def check(self) -> str | None:
        """One look at LIVE, the online store and the sidecar; returns what changed, if anything."""
        current = self._served
        if current is None:
            return None
        live = self.store.live()
        if live is not None and live != current.version:
            return self._switch(live)
        materialized = _mtime(self.feast_dir / MATERIALIZED)
        if materialized is not None and materialized != current.materialized:
            from features.online_sqlite import open_user_rows
            fresh = open_user_rows(self.feast_dir, self.features_dir)
            with current.lock:
                current.rec.store, current.materialized = fresh, materialized
                current.events_store = None     # reopened on the next push, on the new file
            return "online store reopened"
        added = self.sync(current)
        return f"{added} added items synced" if added is not None else None

    def sync(self, served: Served) -> int | None:
        """Apply what the sidecar gained since `served` last looked (another process's additions or
        removals) to its index; None when nothing changed. Index writes go in chunks under
        served.lock: requests go on between them."""
        with served.syncing:    # the watcher and a reader's forwarded write would upsert the same rows twice
            signature = sidecar_signature(served.rec.bundle_dir)
            if signature == served.sidecar:
                return None
            added = sync_additions(served.rec, self.store.root, served.known_items, lock=served.lock,
                                   reader=self.reader)
            served.sidecar = signature
            return added

    def _switch(self, version: str) -> str | None:
        if self._failed and self._failed[0] == version and time.monotonic() - self._failed[1] < RETRY_AFTER_S:
            return None
        try:
            new = self._load(version)
        except Exception as exc:
            self._failed = (version, time.monotonic())
            self.last_error = (f"version {version} did not load ({type(exc).__name__}), still serving "
                               f"{self._served.version if self._served else None}; see the service log")
            log.error("%s: %s", self.last_error, exc)
            return None
        with self._lock:
            old, self._served = self._served, new
            self.reloads += 1
        self._failed, self.last_error = None, None
        if self.on_change:
            self.on_change(new)
        if old is not None:
            self._retire(old)
        log.info("now serving %s (was %s)", version, old.version if old else None)
        return f"switched to {version}"

    def _retire(self, served: Served) -> None:
        """Close a version that no longer takes requests once its last request has finished."""
        with self._lock:
            served.retired = True
            close = served.refs == 0
        if close:
            served.rec.close()
