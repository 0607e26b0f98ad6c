"""Indexes reached through qdrant-client: the shared code, and Qdrant's embedded local mode.

Local mode (`QdrantClient(path=...)`) keeps every point in Python and searches exactly; it is fine
for small catalogs (publish.local_max_items). Its storage is locked by one client at a time, so
each published version has its own folder (`versions/<v>/index/`): publishing builds a new folder
and never needs the lock a running service holds on the live one.
"""
from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qdrant_client import QdrantClient, models

from flows.errors import TowerflowError
from flows.serving.index.base import (COMPARE, ITEM_ID, Condition, Hit, IndexInUse, IndexSettings, VectorIndex,
                                      id_array)

if TYPE_CHECKING:
    import torch

QUERY_CHUNK = 256
SCROLL_BATCH = 10000
LOCAL_COLLECTION = "items"
MASK_CACHE = 256          # distinct filters whose point masks are kept


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


class LocalIndex(ClientIndex):
    """Qdrant local mode in one folder: exact search in Python. Local mode evaluates a filter
    point by point in Python (~107 ms at 10k points), so filters are a cached numpy mask over
    point ids, and exclusions and the mask set scores to -inf before one top-k (`_search`).

    Searches are one numpy matmul over the stored (unit) vectors, read from the collection once:
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
        self._fields: dict[str, pd.DataFrame] | None = None     # field -> (point, value) rows, lists exploded
        self._masks: dict[tuple[Condition, ...], np.ndarray] = {}
        self._matrix: np.ndarray | None = None       # (points, dim) unit vectors, row = point id
        self._items = np.empty(0, dtype=object)      # item_id of each row
        self._present = np.zeros(0, dtype=bool)      # rows that hold a point
        self._row_index = pd.Index([])                   # item ids, and the row of each:
        self._row_points = np.zeros(0, dtype=np.int64)   # ids -> positions (get_indexer) -> rows
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
        # The search arrays follow the write in place: re-reading them all after each write made
        # every read after a chunk of a large POST /items pay a full scroll (~1 s at 7k points).
        self._masks = {}
        if self._fields is not None:
            self._fields = _with_payloads(self._fields, points, payloads)
        if self._matrix is not None:
            self._apply(np.asarray(points, dtype=np.int64), vectors, [p[ITEM_ID] for p in payloads])

    def _apply(self, points: np.ndarray, vectors: np.ndarray, items: list[Any]) -> None:
        size = max(len(self._matrix), int(points.max()) + 1) if len(points) else len(self._matrix)
        if size > len(self._matrix):
            grow = size - len(self._matrix)
            self._matrix = np.vstack([self._matrix, np.zeros((grow, self.settings.dim), dtype=np.float32)])
            self._items = np.concatenate([self._items, np.empty(grow, dtype=object)])
            self._present = np.concatenate([self._present, np.zeros(grow, dtype=bool)])
        self._matrix[points] = _unit(vectors)
        self._items[points] = np.array(items + [None], dtype=object)[:-1]   # keeps tuples/str as objects
        self._present[points] = True
        rows = np.flatnonzero(self._present)
        self._row_index = pd.Index(id_array(self._items[rows].tolist()))
        self._row_points = rows.astype(np.int64)

    def _load_matrix(self) -> np.ndarray:
        rows: dict[int, tuple[Any, list[float]]] = {}
        offset = None
        while True:
            records, offset = self.client.scroll(self.collection, limit=SCROLL_BATCH, offset=offset,
                                                 with_payload=[ITEM_ID], with_vectors=True)
            rows.update((int(r.id), ((r.payload or {}).get(ITEM_ID), r.vector)) for r in records)
            if offset is None:
                break
        matrix = np.zeros((max(rows, default=-1) + 1, self.settings.dim), dtype=np.float32)
        self._items = np.empty(len(matrix), dtype=object)
        self._present = np.zeros(len(matrix), dtype=bool)
        for point, (item, vector) in rows.items():
            matrix[point], self._items[point], self._present[point] = vector, item, True
        self._row_index = pd.Index(id_array([item for item, _ in rows.values()]))
        self._row_points = np.fromiter(rows, dtype=np.int64, count=len(rows))
        # Qdrant scores cosine on normalized vectors; local mode hands back what was upserted.
        self._matrix = np.where(self._present[:, None], _unit(matrix), 0).astype(np.float32)
        return self._matrix

    def _search(self, queries: np.ndarray, k: int, skips: list[Collection[Any]],
                conditions: list[Condition]) -> list[list[Hit]]:
        """The whole search in numpy: the filter mask and each query's exclusions set scores to
        -inf before one top-k, so nothing is over-fetched or filtered hit by hit in Python."""
        matrix = self._matrix if self._matrix is not None else self._load_matrix()
        allowed = self._present.copy()
        if conditions:
            mask = self._point_filter(conditions)
            allowed[len(mask):] = False
            allowed[:len(mask)] &= mask[:len(allowed)]
        blocked = ~allowed
        out: list[list[Hit]] = []
        # torch for the product and the top-k: numpy's BLAS pool and torch's OpenMP pool taking
        # turns on 2 cores cost ~15 ms a 943-user batch. The arrays share memory with the tensors.
        import torch   # loaded with the model wherever a search runs

        vectors = torch.from_numpy(matrix)
        unit = torch.from_numpy(_unit(queries))
        for start in range(0, len(unit), QUERY_CHUNK):
            scores = unit[start:start + QUERY_CHUNK] @ vectors.T                               # (q, points)
            grid = scores.numpy()
            grid[:, blocked] = -np.inf
            rows, cols = self._skipped(skips[start:start + QUERY_CHUNK])
            grid[rows, cols] = -np.inf
            best, top = _top_rows(scores, k)
            for items, values, finite in zip(self._items[top].tolist(), best.tolist(), np.isfinite(best)):
                out.append(list(zip(items, values)) if finite.all() else
                           [(i, v) for i, v, ok in zip(items, values, finite) if ok])
        return out

    def _skipped(self, skips: list[Collection[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(query row, point) of every excluded item that is indexed, for one fancy-index assignment
        (a Python loop per user cost 25 us each: a tenth of a 943-user batch)."""
        flat = list(chain.from_iterable(skips))
        if not flat:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        points = self._row_index.get_indexer(pd.Index(id_array(flat)))   # an id of another type misses
        rows = np.repeat(np.arange(len(skips)), [len(s) for s in skips])
        found = points >= 0
        return rows[found], self._row_points[points[found]]

    def _point_filter(self, conditions: Sequence[Condition]) -> np.ndarray:
        key = tuple(conditions)
        if key not in self._masks:
            if len(self._masks) >= MASK_CACHE:
                self._masks.clear()
            self._masks[key] = self._mask(conditions)
        return self._masks[key]

    def _mask(self, conditions: Sequence[Condition]) -> np.ndarray:
        if self._fields is None:
            rows = list(self._scroll(list(self.settings.fields)))
            self._fields = {f: pd.DataFrame([(p, v) for p, payload in rows for v in _values(payload.get(f))],
                                            columns=["point", "value"]) for f in self.settings.fields}
        mask = np.ones(self.count(), dtype=bool)
        for c in conditions:
            rows = self._fields[c.field]
            if c.values is not None:
                hit = rows["value"].isin(c.values).to_numpy()
            else:
                values = pd.to_numeric(rows["value"], errors="coerce").to_numpy(dtype=float)
                hit = np.logical_and.reduce([COMPARE[op](values, b) for op, b in c.bounds or ()])
            keep = np.zeros_like(mask)
            keep[rows["point"].to_numpy()[hit]] = True
            mask &= keep
        return mask


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, as Qdrant's cosine does with the query."""
    v = np.asarray(vectors, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _top_rows(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best min(k, points) scores of each row of a (queries, points) score matrix and their
    points, best first; equal scores lowest point first, as an exact search orders them."""
    import torch

    k = min(k, scores.shape[1])
    values, top = torch.topk(scores, k, dim=1) if k > 0 else (scores[:, :0], scores[:, :0].long())
    values, top = values.numpy(), top.numpy()
    if k > 1 and (values[:, 1:] == values[:, :-1]).any():    # topk leaves the order of ties open
        order = np.lexsort((top, -values), axis=-1)
        values, top = np.take_along_axis(values, order, axis=1), np.take_along_axis(top, order, axis=1)
    return values, top


@functools.cache
def _blas() -> Any:
    """threadpoolctl's controller (it scans the loaded libraries once, a few ms): the index bench times
    Qdrant local mode's own filtered search with one BLAS thread, as a fair comparison."""
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


def _with_payloads(fields: dict[str, pd.DataFrame], points: Sequence[int],
                   payloads: Sequence[dict]) -> dict[str, pd.DataFrame]:
    """The (point, value) rows of each filterable field after these points were (re)written."""
    written = set(points)
    out = {}
    for name, rows in fields.items():
        kept = rows[~rows["point"].isin(written)]
        new = pd.DataFrame([(p, v) for p, payload in zip(points, payloads) for v in _values(payload.get(name))],
                           columns=["point", "value"])
        out[name] = pd.concat([kept, new], ignore_index=True) if len(new) else kept
    return out


def _values(value: Any) -> list[Any]:
    """A payload value as the list of values a filter can match (multi-valued fields: each one)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
