"""Vector indexes behind one interface (`VectorIndex`): Qdrant local mode, qdrant-edge, a Qdrant server.

    index = create_index("qdrant-edge", settings, path=bundle / "index")   # publish: build
    index.build(vectors, ids, payloads)
    index = open_index(meta["backend"], settings, path=..., collection=...)  # serving: once
    index.search(user_vectors, k=20, exclude=[seen, ...], filter={"genres": "comedy"})

Backends are imported when chosen, so importing this package stays cheap.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flows.errors import ConfigError
from flows.serving.index.base import (BadQuery, Hit, IndexInUse, IndexSettings, VectorIndex, catalog_payloads,
                                      pause_point)

__all__ = ["BACKENDS", "EMBEDDED", "BadQuery", "Hit", "IndexInUse", "IndexSettings", "VectorIndex", "catalog_payloads",
           "choose_backend", "copy_storage", "create_index", "open_index", "pause_point"]

BACKENDS = ("qdrant-local", "qdrant-edge", "qdrant-server")
EMBEDDED = ("qdrant-local", "qdrant-edge")


def choose_backend(requested: str, n_items: int, local_max_items: int, server: bool) -> str:
    """A Qdrant server whenever one is configured; else `requested`, where `auto` means local mode
    up to local_max_items (exact search in Python) and qdrant-edge (HNSW) above."""
    if server:
        return "qdrant-server"
    if requested == "auto":
        return "qdrant-edge" if n_items > local_max_items else "qdrant-local"
    if requested not in EMBEDDED:
        raise ConfigError(f"publish.backend must be auto, {' or '.join(EMBEDDED)}; got '{requested}'")
    return requested


def create_index(backend: str, settings: IndexSettings, *, path: Path | None = None,
                 collection: str | None = None, client: Any = None) -> VectorIndex:
    """A new, empty index to `build`: a folder for embedded backends, a collection on a server."""
    return _make(backend, settings, path, collection, client, create=True)


def open_index(backend: str, settings: IndexSettings, *, path: Path | None = None,
               collection: str | None = None, client: Any = None) -> VectorIndex:
    """An existing index, for searching (and `upsert` of new items)."""
    return _make(backend, settings, path, collection, client, create=False)


def copy_storage(path: Path, into: Path) -> Path:
    """A private copy of an embedded index's folder, to open while another process holds the
    original. The caller keeps that process from writing meanwhile (flows/serving/items.py's
    additions lock: the only writes to a published index are added items)."""
    target = Path(into) / "index"
    # Qdrant local mode's `.lock` is only flocked, never read: the copy gets its own.
    shutil.copytree(path, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def _make(backend: str, settings: IndexSettings, path: Path | None, collection: str | None,
          client: Any, create: bool) -> VectorIndex:
    if backend == "qdrant-local":
        from flows.serving.index.qdrant_local import LocalIndex
        return LocalIndex(_need(path, backend), settings, create=create)
    if backend == "qdrant-edge":
        from flows.serving.index.qdrant_edge import EdgeIndex
        return EdgeIndex(_need(path, backend), settings, create=create)
    if backend == "qdrant-server":
        from flows.serving.index.qdrant_server import ServerIndex, server_client
        if collection is None:
            raise ConfigError("qdrant-server: a collection name is needed")
        return ServerIndex(client if client is not None else server_client(), collection, settings, create=create)
    raise ConfigError(f"unknown index backend '{backend}'; backends are: {', '.join(BACKENDS)}")


def _need(path: Path | None, backend: str) -> Path:
    if path is None:
        raise ConfigError(f"{backend}: a storage folder is needed")
    return Path(path)
