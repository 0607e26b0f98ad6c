"""The one interface every vector index behind serving implements, and what they share.

Point ids are 0..n-1 in catalog order, new items get the next ones: Qdrant accepts only unsigned
ints and UUIDs, while contract item ids may be any int64 or string. The item id travels as the
`item_id` payload, next to the filterable item features (schema.json's categorical / numeric /
multi-valued columns), so a hit needs no lookup table to be turned back into an item.

Backends implement a few primitives (`_write`, `_query`, `_point_of`, ...); input checks, the
filter's parsing and seen-item exclusion (over-fetch and drop) live here, once. Qdrant local mode,
whose own filters and exclusions run point by point in Python, searches its own way (`_search`).
"""
from __future__ import annotations

import math
import operator
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from flows.durable import pause_point  # noqa: F401  (the fault tests' hook, used below and by publish)
from flows.errors import TowerflowError

ITEM_ID = "item_id"
Hit = tuple[Any, float]                       # (item_id, cosine score)
COMPARE = {"gte": operator.ge, "gt": operator.gt, "lte": operator.le, "lt": operator.lt}
RANGE_KEYS = tuple(COMPARE)


def server_url() -> str | None:
    """The Qdrant server of the qdrant-server backend (QDRANT_URL), or None. Here, not in
    qdrant_server.py: publish asks it before it knows its backend, and that module imports
    qdrant_client (2.6 s of an embedded backend's publish that never used it)."""
    return os.environ.get("QDRANT_URL") or None


def collection_name(prefix: str, version: str) -> str:
    """Qdrant collection names: letters, digits, '_' and '-' are safe everywhere."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}_{version}")


class BadQuery(TowerflowError):
    """A request the index cannot answer as asked (unknown item or filter field, a bad value):
    the caller's mistake, so the HTTP layer answers it with a 4xx."""


class IndexInUse(TowerflowError):
    """An embedded index's storage is held by another process (one process at a time: a running
    service, usually). A reader can search a copy instead (`copy_storage`)."""


@dataclass(frozen=True)
class IndexSettings:
    """What a backend needs to build or open an index; stored in bundle.json."""

    dim: int
    fields: dict[str, str] = field(default_factory=dict)   # filterable payload field -> keyword|integer|float
    id_kind: str = "integer"                                # the item_id payload: integer | keyword
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    search_ef: int = 128
    quantization: str = "none"                              # none | scalar
    upsert_batch: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IndexSettings":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Condition:
    """One parsed filter clause: the field's value is one of `values`, or lies in `bounds`."""

    field: str
    values: tuple[Any, ...] | None = None
    bounds: tuple[tuple[str, float], ...] | None = None



def parse_filter(spec: Mapping[str, Any] | None, fields: Mapping[str, str]) -> list[Condition]:
    """{"genres": "comedy", "brand": ["a", "b"], "year": {"gte": 1990, "lt": 2000}} -> conditions
    (all must hold; a list means any of its values). Unknown fields and wrong types are BadQuery."""
    if not spec:
        return []
    if not isinstance(spec, Mapping):
        raise BadQuery(f"filter must be an object of field -> value, got {type(spec).__name__}")
    out = []
    for name, value in spec.items():
        kind = fields.get(name)
        if kind is None:
            known = ", ".join(sorted(fields)) or "none"
            raise BadQuery(f"unknown filter field '{name}'; filterable fields: {known}")
        out.append(_condition(name, kind, value))
    return out


def _condition(name: str, kind: str, value: Any) -> Condition:
    if isinstance(value, Mapping):
        bad = [k for k in value if k not in RANGE_KEYS]
        if bad or not value or kind == "keyword":
            raise BadQuery(f"filter '{name}': a range takes {'/'.join(RANGE_KEYS)} on a numeric field, got {dict(value)!r}")
        return Condition(name, bounds=tuple((op, _number(name, b)) for op, b in value.items()))
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise BadQuery(f"filter '{name}': an empty list matches nothing")
    if kind == "float":   # Qdrant matches only keywords / integers: equality on a float is a closed range
        if len(values) != 1:
            raise BadQuery(f"filter '{name}' is numeric: give one value or a range like {{'gte': 1990}}")
        v = _number(name, values[0])
        return Condition(name, bounds=(("gte", v), ("lte", v)))
    want = str if kind == "keyword" else int
    for v in values:
        if isinstance(v, bool) or not isinstance(v, want):
            raise BadQuery(f"filter '{name}': expected {'a string' if want is str else 'an integer'}, got {v!r}")
    return Condition(name, values=tuple(values))


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadQuery(f"filter '{name}': expected a finite number, got {v!r}")
    return float(v)


def catalog_payloads(items: pd.DataFrame, features: Mapping[str, Sequence[str]]) -> tuple[dict[str, str], list[dict]]:
    """The filterable fields (name -> kind) and one payload per catalog row: item_id + the item
    feature columns of schema.json. Missing values are left out (a filter never matches them)."""
    kinds: dict[str, str] = {}
    for col in features.get("categorical", []):
        kinds[col] = "integer" if pd.api.types.is_integer_dtype(items[col]) else "keyword"
    for col in features.get("numeric", []):
        kinds[col] = "float"
    for col in features.get("multi", []):
        first = next((v for v in items[col] if isinstance(v, (list, tuple, np.ndarray)) and len(v)), None)
        kinds[col] = "integer" if first is not None and isinstance(first[0], (int, np.integer)) else "keyword"
    columns = {c: items[c].tolist() for c in kinds if c in items.columns}
    payloads = []
    for row, item in enumerate(items[ITEM_ID].tolist()):
        payload: dict[str, Any] = {ITEM_ID: plain(item)}
        for col, values in columns.items():
            v = _payload_value(values[row], kinds[col])
            if v is not None:
                payload[col] = v
        payloads.append(payload)
    return {c: k for c, k in kinds.items() if c in columns}, payloads


def _payload_value(v: Any, kind: str) -> Any:
    if isinstance(v, (list, tuple, np.ndarray)):
        return [plain(x) if kind == "integer" else str(x) for x in v if x is not None]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if kind == "float":
        f = float(v)
        return f if math.isfinite(f) else None
    return plain(v) if kind == "integer" else str(v)


def plain(value: Any) -> Any:
    """A numpy scalar as the Python int / str / float a payload (JSON) can hold."""
    return value.item() if isinstance(value, np.generic) else value


def id_array(ids: list) -> np.ndarray:
    """Item ids as one array: int64 when they are all integers, else objects as they are.
    (Letting pandas infer the type of 100k ids costs ~15 ms; numpy's int conversion ~3 ms.)"""
    if ids and isinstance(ids[0], (int, np.integer)) and not isinstance(ids[0], bool):
        ints = np.array(ids)
        if ints.dtype.kind in "iu":
            return ints
    out = np.empty(len(ids), dtype=object)
    out[:] = ids
    return out


class VectorIndex(ABC):
    """A cosine index over the catalog's item vectors. One instance = one open storage; a
    serving process opens the live version once and queries it from then on."""

    backend: ClassVar[str]

    def __init__(self, settings: IndexSettings):
        self.settings = settings
        # Point count, cached: only this object writes to its storage (embedded storage is locked to
        # one process, a server collection belongs to one version), and an exact count costs ~5 ms
        # per call at 30k points in qdrant-edge, more than the search itself.
        self._size: int | None = None
        # Removed items (tombstones, flows/serving/items.py): their points stay, searches skip them.
        # Kept in memory: whoever opens the index re-applies the bundle's tombstones.
        self.hidden: set[Any] = set()

    # --- primitives each backend implements -----------------------------------------------------
    @abstractmethod
    def _write(self, points: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None: ...

    @abstractmethod
    def _query(self, vectors: np.ndarray, limits: Sequence[int], conditions: Sequence[Condition]) -> list[list[Hit]]:
        """Top-limits[i] hits for each vector, best first, only items matching `conditions`."""

    @abstractmethod
    def _point_of(self, item_id: Any) -> int | None: ...

    @abstractmethod
    def vector_of(self, item_id: Any) -> np.ndarray | None:
        """The stored (unit-length) vector of an item, None when it is not in the index."""

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def item_ids(self) -> list[Any]:
        """Every point's item_id, in point-id order (what verification compares with the catalog)."""

    @abstractmethod
    def close(self) -> None: ...

    def _finish(self) -> None:
        """After the initial upsert: build the ANN structures and make the storage durable."""

    def keep_writes_in_memory(self) -> None:
        """This index is a private copy, removed when closed (flows/serving/recommend.py
        `_open_copy`): later writes need not reach its storage. A backend may then skip that work."""

    # --- the interface ----------------------------------------------------------------------------
    def build(self, vectors: np.ndarray, ids: Sequence[Any], payloads: Sequence[dict]) -> None:
        """Fill a new, empty index: point i = ids[i], vectors[i], payloads[i] (item_id added)."""
        vectors = self._checked(vectors, len(ids), len(payloads))
        step = self.settings.upsert_batch
        for start in range(0, len(ids), step):
            stop = min(start + step, len(ids))
            self._write(range(start, stop), vectors[start:stop],
                        [{**payloads[i], ITEM_ID: plain(ids[i])} for i in range(start, stop)])
            if start == 0:
                pause_point("upsert")
        self._finish()
        self._size = None

    def upsert(self, ids: Sequence[Any], vectors: np.ndarray, payloads: Sequence[dict]) -> list[int]:
        """Add items (new ids get the next point ids) or replace known ones; returns their points."""
        vectors = self._checked(vectors, len(ids), len(payloads))
        next_point, points = self.count(), []
        for item in ids:
            point = self._point_of(plain(item))
            if point is None:
                point, next_point = next_point, next_point + 1
            points.append(point)
        self._write(points, vectors, [{**p, ITEM_ID: plain(i)} for i, p in zip(ids, payloads)])
        self._size = None
        self.hidden.difference_update(plain(i) for i in ids)    # added again after a removal
        return points

    def has(self, item_id: Any) -> bool:
        """Whether the item has a point (hidden or not); cheaper than vector_of (no vector read)."""
        return self._point_of(plain(item_id)) is not None

    def hide(self, ids: Sequence[Any]) -> None:
        """Leave these items out of every answer from now on (a removal); `upsert` brings them back."""
        self.hidden.update(plain(i) for i in ids)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[Any]] | None = None,
               filter: Mapping[str, Any] | None = None) -> list[list[Hit]]:
        """Top-k (item_id, score) per query vector, best first, without exclude[i]'s items and
        only items matching `filter`. Exclusions are over-fetched and dropped here, never sent as
        a must_not id list (local mode evaluates those in Python, ~40 ms per query at 10k items)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.settings.dim:
            raise BadQuery(f"query vectors must have shape (n, {self.settings.dim}), got {queries.shape}")
        if k < 1:
            raise BadQuery(f"k must be at least 1, got {k}")
        if exclude is not None and len(exclude) != len(queries):
            raise BadQuery(f"exclude has {len(exclude)} entries for {len(queries)} query vectors")
        conditions = parse_filter(filter, self.settings.fields)
        skips = list(exclude) if exclude is not None else [() for _ in range(len(queries))]
        if self.hidden:    # removed items: skipped like the user's seen ones, by every backend
            skips = [self.hidden.union(s) for s in skips]
        return self._search(queries, k, skips, conditions)

    def similar(self, item_id: Any, k: int, filter: Mapping[str, Any] | None = None) -> list[Hit]:
        """The k items nearest to an indexed item (itself left out)."""
        vector = self.vector_of(plain(item_id))
        if vector is None or plain(item_id) in self.hidden:
            raise BadQuery(f"item_id {item_id!r} is not in the index")
        return self.search(vector[None, :], k, exclude=[{plain(item_id)}], filter=filter)[0]

    def _search(self, queries: np.ndarray, k: int, skips: list[Collection[Any]],
                conditions: list[Condition]) -> list[list[Hit]]:
        """Over-fetch by the exclusions and drop them here: k + len(skip) hits hold k that are not
        excluded (or all there are). The backend applies the filter itself."""
        if self._size is None:
            self._size = self.count()
        if self._size == 0 or not len(queries):
            return [[] for _ in skips]
        skips = [s if isinstance(s, (set, frozenset)) else set(s) for s in skips]   # tested per hit
        raw = self._query(queries, [min(self._size, k + len(s)) for s in skips], conditions)
        return [[hit for hit in hits if hit[0] not in skip][:k] for hits, skip in zip(raw, skips)]

    def _checked(self, vectors: np.ndarray, n_ids: int, n_payloads: int) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (n_ids, self.settings.dim) or n_payloads != n_ids:
            raise BadQuery(f"expected {n_ids} vectors of size {self.settings.dim} and as many payloads, got "
                           f"vectors of shape {vectors.shape} and {n_payloads} payloads")
        return vectors

    def __enter__(self) -> "VectorIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
