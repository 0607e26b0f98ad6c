"""Exact search over the catalog held as numpy arrays: Qdrant local mode's search, and the published
files of a local-mode bundle read without qdrant-client.

`ArraySearch` keeps every point's unit vector in one (points, dim) matrix; a search is one matrix
product, the filter and the exclusions set scores to -inf, then one top-k. Where the arrays come
from is the subclass's part: `LocalIndex` (qdrant_local.py) scrolls them out of its collection, and
`BundleArrays` reads the bundle's item_vectors.parquet and items.parquet, the files the collection
was built from (point i = row i; flows/stages/publish.py) and that the bundle's digests cover. A
one-shot `towerflow recommend` answers from `BundleArrays`: qdrant-client's import and local mode's
load of every point (1.2-1.9 s on the demo) are most of what a single answer would cost.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from flows.errors import TowerflowError
from flows.serving.index.base import (COMPARE, ITEM_ID, Condition, Hit, IndexSettings, VectorIndex,
                                      catalog_payloads, id_array)

if TYPE_CHECKING:
    import torch

QUERY_CHUNK = 256
MASK_CACHE = 256          # distinct filters whose point masks are kept


class ArraySearch(ABC):
    """The search arrays and the exact search over them; mixed into a VectorIndex whose
    `_load_matrix` fills them (through `_set_rows`) and whose `_field_rows` gives each filterable
    field's (point, value) rows."""

    settings: IndexSettings
    # torch for the product and the top-k where the model is loaded with torch anyway: numpy's BLAS
    # pool and torch's OpenMP pool taking turns on 2 cores cost ~15 ms a 943-user batch. A reader in
    # a process without torch (the one-shot CLI) stays with numpy.
    use_torch: ClassVar[bool] = True

    def _init_arrays(self) -> None:
        self._fields: dict[str, pd.DataFrame] | None = None     # field -> (point, value) rows, lists exploded
        self._masks: dict[tuple[Condition, ...], np.ndarray] = {}
        self._matrix: np.ndarray | None = None       # (points, dim) unit vectors, row = point id
        self._items = np.empty(0, dtype=object)      # item_id of each row
        self._present = np.zeros(0, dtype=bool)      # rows that hold a point
        self._row_index = pd.Index([])                   # item ids, and the row of each:
        self._row_points = np.zeros(0, dtype=np.int64)   # ids -> positions (get_indexer) -> rows

    @abstractmethod
    def _load_matrix(self) -> np.ndarray:
        """Fill the search arrays (`_set_rows`) from where the points are kept; return the matrix."""

    @abstractmethod
    def _field_rows(self) -> dict[str, pd.DataFrame]:
        """Each filterable field's (point, value) rows (`field_rows`)."""

    def _set_rows(self, points: np.ndarray, items: list[Any], vectors: np.ndarray) -> np.ndarray:
        """The search arrays from every point's id, item and vector (any order)."""
        points = np.asarray(points, dtype=np.int64)
        size = int(points.max()) + 1 if len(points) else 0
        matrix = np.zeros((size, self.settings.dim), dtype=np.float32)
        self._items = np.empty(size, dtype=object)
        self._present = np.zeros(size, dtype=bool)
        if len(points):
            # Qdrant scores cosine on normalized vectors; local mode hands back what was upserted.
            matrix[points] = _unit(vectors)
            self._items[points] = np.array(list(items) + [None], dtype=object)[:-1]  # keeps tuples/str as objects
            self._present[points] = True
        self._row_index = pd.Index(id_array(list(items)))
        self._row_points = points
        self._matrix = matrix
        return matrix

    def _remember(self, points: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        """The search arrays follow a write in place: re-reading them all after each write made every
        read after a chunk of a large POST /items pay a full scroll (~1 s at 7k points)."""
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

    def _search(self, queries: np.ndarray, k: int, skips: list[Collection[Any]],
                conditions: list[Condition]) -> list[list[Hit]]:
        """The whole search in arrays: the filter mask and each query's exclusions set scores to
        -inf before one top-k, so nothing is over-fetched or filtered hit by hit in Python."""
        matrix = self._matrix if self._matrix is not None else self._load_matrix()
        allowed = self._present.copy()
        if conditions:
            mask = self._point_filter(conditions)
            allowed[len(mask):] = False
            allowed[:len(mask)] &= mask[:len(allowed)]
        blocked = ~allowed
        out: list[list[Hit]] = []
        unit = _unit(queries)
        if self.use_torch:
            import torch   # loaded with the model wherever this search runs

            vectors, unit = torch.from_numpy(matrix), torch.from_numpy(unit)   # share memory with the arrays
        else:
            vectors = matrix
        for start in range(0, len(unit), QUERY_CHUNK):
            scores = unit[start:start + QUERY_CHUNK] @ vectors.T                               # (q, points)
            grid = scores.numpy() if self.use_torch else scores
            grid[:, blocked] = -np.inf
            rows, cols = self._skipped(skips[start:start + QUERY_CHUNK])
            grid[rows, cols] = -np.inf
            best, top = _top_rows(scores, k) if self.use_torch else _top_rows_numpy(grid, k)
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
            self._fields = self._field_rows()
        size = len(self._matrix) if self._matrix is not None else len(self._load_matrix())
        mask = np.ones(size, dtype=bool)
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


def field_rows(points: Sequence[int], payloads: Sequence[dict], fields: Collection[str]) -> dict[str, pd.DataFrame]:
    """Each filterable field's (point, value) rows, multi-valued payloads exploded."""
    return {f: pd.DataFrame([(p, v) for p, payload in zip(points, payloads) for v in _values(payload.get(f))],
                            columns=["point", "value"]) for f in fields}


class BundleArrays(ArraySearch, VectorIndex):
    """A published qdrant-local bundle searched from its own files, read-only: the same points,
    vectors and payloads its collection was built from. Writes (the bundle's sidecar of added and
    removed items, applied by the caller) stay in memory."""

    backend = "qdrant-local"
    use_torch = False

    def __init__(self, bundle_dir: Path, settings: IndexSettings, item_features: Mapping[str, Sequence[str]]):
        import pyarrow.parquet as pq

        super().__init__(settings)
        self._init_arrays()
        vectors_path, items_path = Path(bundle_dir) / "item_vectors.parquet", Path(bundle_dir) / "items.parquet"
        for path in (vectors_path, items_path):
            if not path.is_file():
                raise TowerflowError(f"{path}: not found (a damaged bundle: publish again or roll back)")
        table = pq.read_table(vectors_path)
        ids = table.column(ITEM_ID).to_pylist()
        vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
        if vectors.shape[1] != settings.dim:
            raise TowerflowError(f"{vectors_path}: vectors of size {vectors.shape[1]}, the index's are {settings.dim}")
        _, payloads = catalog_payloads(pd.read_parquet(items_path), item_features)
        points = np.arange(len(ids), dtype=np.int64)
        self._set_rows(points, ids, vectors)
        self._fields = field_rows(points, payloads, settings.fields)
        self._points: dict[Any, int] = {item: int(p) for p, item in zip(points, ids)}

    # both read in __init__, and kept up to date by the writes (`_remember`)
    def _load_matrix(self) -> np.ndarray:
        return self._matrix

    def _field_rows(self) -> dict[str, pd.DataFrame]:
        return self._fields

    def _write(self, points: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        self._points.update((p[ITEM_ID], point) for point, p in zip(points, payloads))
        self._remember(points, vectors, payloads)

    def _query(self, vectors: np.ndarray, limits: Sequence[int], conditions: Sequence[Condition]) -> list[list[Hit]]:
        hits = self._search(vectors, max(limits, default=0), [() for _ in limits], list(conditions))
        return [h[:limit] for h, limit in zip(hits, limits)]

    def _point_of(self, item_id: Any) -> int | None:
        return self._points.get(item_id)

    def vector_of(self, item_id: Any) -> np.ndarray | None:
        point = self._points.get(item_id)
        return None if point is None else self._matrix[point].copy()

    def count(self) -> int:
        return len(self._points)

    def item_ids(self) -> list[Any]:
        return [item for item, _ in sorted(self._points.items(), key=lambda pair: pair[1])]

    def close(self) -> None:
        pass


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
    return _ties_by_point(values.numpy(), top.numpy())


def _top_rows_numpy(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`_top_rows` of a numpy score matrix."""
    k = min(k, scores.shape[1])
    if k == 0:
        return scores[:, :0], np.zeros((len(scores), 0), dtype=np.int64)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.broadcast_to(np.arange(k), scores.shape).copy()
    values = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -values), axis=-1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(top, order, axis=1)


def _ties_by_point(values: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if top.shape[1] > 1 and (values[:, 1:] == values[:, :-1]).any():    # topk leaves the order of ties open
        order = np.lexsort((top, -values), axis=-1)
        values, top = np.take_along_axis(values, order, axis=1), np.take_along_axis(top, order, axis=1)
    return values, top


def _with_payloads(fields: dict[str, pd.DataFrame], points: Sequence[int],
                   payloads: Sequence[dict]) -> dict[str, pd.DataFrame]:
    """The (point, value) rows of each filterable field after these points were (re)written."""
    written = set(points)
    new = field_rows(points, payloads, fields)
    out = {}
    for name, rows in fields.items():
        kept = rows[~rows["point"].isin(written)]
        out[name] = pd.concat([kept, new[name]], ignore_index=True) if len(new[name]) else kept
    return out


def _values(value: Any) -> list[Any]:
    """A payload value as the list of values a filter can match (multi-valued fields: each one)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
