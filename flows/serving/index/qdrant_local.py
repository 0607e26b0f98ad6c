"""Indexes reached through qdrant-client: the shared code, and Qdrant's embedded local mode.

Local mode (`QdrantClient(path=...)`) keeps every point in Python and searches exactly; it is fine
for small catalogs (publish.local_max_items). Its storage is locked by one client at a time, so
each published version has its own folder (`versions/<v>/index/`): publishing builds a new folder
and never needs the lock a running service holds on the live one.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from qdrant_client import QdrantClient, models

from flows.errors import TowerflowError
from flows.serving.index.arrays import QUERY_CHUNK, ArraySearch, field_rows
from flows.serving.index.base import ITEM_ID, Condition, Hit, IndexInUse, IndexSettings, VectorIndex

SCROLL_BATCH = 10000
LOCAL_COLLECTION = "items"


class ClientIndex(VectorIndex):
    """One collection through a QdrantClient (local mode or a server)."""

    def __init__(self, client: QdrantClient, collection: str, settings: IndexSettings):
        super().__init__(settings)
        self.client = client
        self.collection = collection

    def _create(self, vectors_config: models.VectorParams) -> None:
        self.client.create_collection(self.collection, vectors_config=vectors_config)

    def _write(self, points: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        self.client.upsert(self.collection, wait=True, points=models.Batch(
            ids=list(points), vectors=vectors.tolist(), payloads=list(payloads)))

    def _query(self, vectors: np.ndarray, limits: Sequence[int], conditions: Sequence[Condition]) -> list[list[Hit]]:
        qfilter = client_filter(conditions) if conditions else None
        out: list[list[Hit]] = []
        for start in range(0, len(vectors), QUERY_CHUNK):
            requests = [models.QueryRequest(query=v.tolist(), limit=lim, filter=qfilter, with_payload=[ITEM_ID],
                                            params=self._search_params(lim))
                        for v, lim in zip(vectors[start:start + QUERY_CHUNK], limits[start:start + QUERY_CHUNK])]
            for resp in self.client.query_batch_points(self.collection, requests=requests):
                out.append([(p.payload[ITEM_ID], float(p.score)) for p in resp.points if p.payload])
        return out

    def _search_params(self, limit: int) -> models.SearchParams | None:
        return None

    def _point_of(self, item_id: Any) -> int | None:
        records, _ = self.client.scroll(self.collection, limit=1, with_payload=False, scroll_filter=models.Filter(
            must=[models.FieldCondition(key=ITEM_ID, match=models.MatchValue(value=item_id))]))
        return int(records[0].id) if records else None

    def vector_of(self, item_id: Any) -> np.ndarray | None:
        point = self._point_of(item_id)
        if point is None:
            return None
        (record,) = self.client.retrieve(self.collection, ids=[point], with_vectors=True)
        return np.asarray(record.vector, dtype=np.float32)

    def count(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def item_ids(self) -> list[Any]:
        pairs = sorted(self._scroll_ids())
        return [item for _, item in pairs]

    def _scroll_ids(self) -> Iterator[tuple[int, Any]]:
        yield from ((point, payload.get(ITEM_ID)) for point, payload in self._scroll([ITEM_ID]))

    def _scroll(self, fields: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        offset = None
        while True:
            records, offset = self.client.scroll(self.collection, limit=SCROLL_BATCH, offset=offset,
                                                 with_payload=fields)
            yield from ((int(r.id), r.payload or {}) for r in records)
            if offset is None:
                return

    def close(self) -> None:
        self.client.close()


def client_filter(conditions: Sequence[Condition]) -> models.Filter:
    """Parsed conditions as a qdrant-client Filter (all must hold)."""
    must: list[Any] = []
    for c in conditions:
        if c.values is not None:
            match = (models.MatchValue(value=c.values[0]) if len(c.values) == 1
                     else models.MatchAny(any=list(c.values)))
            must.append(models.FieldCondition(key=c.field, match=match))
        else:
            must.append(models.FieldCondition(key=c.field, range=models.Range(**dict(c.bounds or ()))))
    return models.Filter(must=must)


class LocalIndex(ArraySearch, ClientIndex):
    """Qdrant local mode in one folder: exact search in Python. Local mode evaluates a filter
    point by point in Python (~107 ms at 10k points), so filters are a cached numpy mask over
    point ids, and exclusions and the mask set scores to -inf before one top-k (`_search`).

    Searches are one matmul over the stored (unit) vectors, read from the collection once (arrays.py):
    local mode's own search is the same exact cosine ranking but builds a pydantic object per
    returned point (~10 us each), which made a demo batch (943 users, k=100 plus their seen items)
    take 3.3 s instead of ~0.05 s. Qdrant stays the storage (and the format a server would load)."""

    backend = "qdrant-local"

    def __init__(self, path: Path, settings: IndexSettings, create: bool = False):
        path = Path(path)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise TowerflowError(f"{path}: index storage not found")
        try:
            client = QdrantClient(path=str(path))
        except RuntimeError as exc:   # qdrant-client's message for a locked folder
            raise IndexInUse(f"{path}: the index storage is open in another process ({exc})") from exc
        super().__init__(client, LOCAL_COLLECTION, settings)
        self._points: dict[Any, int] | None = None
        self._init_arrays()
        if create:
            # Cosine: the towers' outputs are L2-normalized, so this ranks like their dot product.
            self._create(models.VectorParams(size=settings.dim, distance=models.Distance.COSINE))
            self._fast_writes()
        elif not client.collection_exists(LOCAL_COLLECTION):
            client.close()
            raise TowerflowError(f"{path}: index storage holds no collection '{LOCAL_COLLECTION}'")
        else:
            self._live_writes()

    def _fast_writes(self) -> None:
        """Local mode commits every point to SQLite with an fsync (10k points: 10 s). A version
        being built is thrown away if the process dies, and the publish fsyncs the whole folder
        before it goes live, so per-point syncs buy nothing here: turn them off (~4x faster).
        This reaches into qdrant-client internals, so it is skipped if they change."""
        storage = self._storage()
        if storage is not None:
            storage.execute("PRAGMA synchronous=OFF")

    def _live_writes(self) -> None:
        """An opened (published) index takes added items one SQLite commit per point, each with an
        fsync by default (1-20 ms a point: 5,000 items took 6.5 s to 90 s). Write-ahead logging
        with synchronous=NORMAL commits without an fsync and cannot corrupt the file; a power cut
        may lose the last points, which the bundle's fsynced sidecar restores on the next load
        (flows/serving/items.py, sync_own_additions). Skipped if qdrant-client's internals change."""
        storage = self._storage()
        if storage is not None:
            storage.execute("PRAGMA journal_mode=WAL")
            storage.execute("PRAGMA synchronous=NORMAL")

    def keep_writes_in_memory(self) -> None:
        """Local mode commits every upserted point to its SQLite file: in a private copy (a service
        reader's, thrown away on close) that was a third of the reader's CPU for a 5,000-item
        addition (1.0 of 2.9 s), taken from the reads. Without its persistence handle local mode
        keeps the points in memory only. Skipped if qdrant-client's internals change."""
        collection = getattr(getattr(self.client, "_client", None), "collections", {}).get(LOCAL_COLLECTION)
        persistence = getattr(collection, "storage", None)
        if persistence is not None and hasattr(persistence, "persist"):
            persistence.close()
            collection.storage = None

    def _storage(self) -> Any:
        collections = getattr(getattr(self.client, "_client", None), "collections", {})
        storage = getattr(getattr(collections.get(LOCAL_COLLECTION), "storage", None), "storage", None)
        return storage if storage is not None and hasattr(storage, "execute") else None

    def _point_of(self, item_id: Any) -> int | None:
        # Local mode filters by scanning in Python; one id map, built once, is far cheaper.
        if self._points is None:
            self._points = {item: point for point, item in self._scroll_ids()}
        return self._points.get(item_id)

    def _write(self, points: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        super()._write(points, vectors, payloads)
        if self._points is not None:
            self._points.update((p[ITEM_ID], point) for point, p in zip(points, payloads))
        self._remember(points, vectors, payloads)

    def _load_matrix(self) -> np.ndarray:
        rows: dict[int, tuple[Any, list[float]]] = {}
        offset = None
        while True:
            records, offset = self.client.scroll(self.collection, limit=SCROLL_BATCH, offset=offset,
                                                 with_payload=[ITEM_ID], with_vectors=True)
            rows.update((int(r.id), ((r.payload or {}).get(ITEM_ID), r.vector)) for r in records)
            if offset is None:
                break
        vectors = np.array([vector for _, vector in rows.values()], dtype=np.float32).reshape(len(rows), self.settings.dim)
        return self._set_rows(np.fromiter(rows, dtype=np.int64, count=len(rows)),
                              [item for item, _ in rows.values()], vectors)

    def _field_rows(self) -> dict[str, pd.DataFrame]:
        points, payloads = zip(*self._scroll(list(self.settings.fields))) if self.count() else ((), ())
        return field_rows(points, payloads, self.settings.fields)


@functools.cache
def _blas() -> Any:
    """threadpoolctl's controller (it scans the loaded libraries once, a few ms): the index bench times
    Qdrant local mode's own filtered search with one BLAS thread, as a fair comparison."""
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()
