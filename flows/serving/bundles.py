"""Publishing policy over the bundle store (flows/serving/store.py owns the files): version names,
what a Qdrant server keeps outside a version's folder, listing and rollback.

A rollback checks the target's file digests before LIVE moves (BundleStore.switch), and brings back
everything of that version together: model, vectors, index and its ranker.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.errors import PublishError
# The store's names, for the callers that import them from here.
from flows.serving.store import (  # noqa: F401
    BUNDLE_JSON, MODEL_FILES, BundleStore, NothingPublished, model_digest,
)
from flows.durable import fsync_tree, write_atomic  # noqa: F401


def version_name(digest: str, now: datetime | None = None) -> str:
    """`<utc yyyymmddTHHMMSS>-<8 hex of the content digest>`: sorts by time, names the content."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}-{digest[:8]}"


class QdrantServerStorage:
    """A version's collection on a Qdrant server: the alias moves with LIVE, the collection goes
    with the version (BundleStore's `Outside`)."""

    def switch(self, meta: dict[str, Any]) -> None:
        from flows.serving.index.qdrant_server import server_client, switch_alias
        client = server_client()
        try:
            switch_alias(client, meta["alias"], meta["collection"])
        finally:
            client.close()

    def drop(self, meta: dict[str, Any]) -> None:
        from flows.serving.index.qdrant_server import drop_collection, server_client, server_url
        if server_url() is None:   # cannot reach it: the collection stays (listed by the server)
            return
        client = server_client()
        try:
            drop_collection(client, meta["collection"])
        finally:
            client.close()


def open_store(root: Path) -> BundleStore:
    """The store with what changing it needs (publish, rollback, prune)."""
    return BundleStore(root, QdrantServerStorage())


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
    one was published (bundle.json `previous`). Refused when its files fail their digests.
    Returns (from, to)."""
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
        try:
            store.switch(target, "rollback", reason or "rollback")
        except PublishError as exc:
            raise PublishError(f"rollback refused: {exc}; {live} stays live") from None
        return live, target
