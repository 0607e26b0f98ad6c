"""The embedded Qdrant engine (qdrant-edge-py: Rust, HNSW, payload indexes) in one folder per version.

For catalogs beyond what local mode searches fast. A shard locks its write-ahead log, so like local
mode it is opened by one process; publishing builds a new folder and never touches the live one.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from flows.errors import TowerflowError
from flows.serving.index.base import ITEM_ID, Condition, Hit, IndexInUse, IndexSettings, VectorIndex

QUERY_CHUNK = 256
SCROLL_BATCH = 10000
# Qdrant's default: a filtered search whose candidates take less than this many KB of vectors is
# answered by an exact scan instead of the graph.
FULL_SCAN_KB = 10000
# Quantized search: score 2x the candidates with int8 vectors, rescore them with the originals
# (with limit 1 and no oversampling, a near-duplicate can win on int8 rounding alone).
OVERSAMPLING = 2.0
PAYLOAD_SCHEMA = {"keyword": qe.PayloadSchemaType.Keyword, "integer": qe.PayloadSchemaType.Integer,
                  "float": qe.PayloadSchemaType.Float}


class EdgeIndex(VectorIndex):
    backend = "qdrant-edge"

    def __init__(self, path: Path, settings: IndexSettings, create: bool = False):
        super().__init__(settings)
        self.path = Path(path)
        try:
            if create:
                self.shard = qe.EdgeShard.create(str(self.path), self._config())
                for name, kind in {ITEM_ID: settings.id_kind, **settings.fields}.items():
                    self.shard.update(qe.UpdateOperation.create_field_index(name, PAYLOAD_SCHEMA[kind]))
            elif not self.path.is_dir():
                raise TowerflowError(f"{self.path}: index storage not found")
            else:
                self.shard = qe.EdgeShard.load(str(self.path))
        except TowerflowError:
            raise
        except Exception as exc:   # qdrant-edge raises plain Exception: a locked WAL, a damaged shard
            if "WouldBlock" in str(exc):    # the WAL's lock: another process has the shard open
                raise IndexInUse(f"{self.path}: the index storage is open in another process ({exc})") from exc
            raise TowerflowError(f"{self.path}: cannot open the qdrant-edge shard ({exc})") from exc

    def _config(self) -> qe.EdgeConfig:
        s = self.settings
        quantization = (qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, always_ram=True)
                        if s.quantization == "scalar" else None)
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=s.dim, distance=qe.Distance.Cosine),
            hnsw_config=qe.HnswIndexConfig(m=s.hnsw_m, ef_construct=s.hnsw_ef_construct,
                                           full_scan_threshold=FULL_SCAN_KB),
            quantization_config=quantization,
            # Index every segment whatever its size (the default waits for ~10 MB of vectors), so a
            # small catalog is served by the same HNSW code path that verification measured.
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
        )

    def _write(self, points: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        self.shard.update(qe.UpdateOperation.upsert_points(
            [qe.Point(int(p), v, payload) for p, v, payload in zip(points, vectors.tolist(), payloads)]))

    def _finish(self) -> None:
        self.shard.optimize()   # builds HNSW (and quantized vectors) for the segments
        self.shard.flush()

    def _params(self, limit: int) -> qe.SearchParams:
        quantization = qe.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING) if self.settings.quantization == "scalar" else None
        return qe.SearchParams(hnsw_ef=max(self.settings.search_ef, limit), quantization=quantization)

    def _query(self, vectors: np.ndarray, limits: Sequence[int], conditions: Sequence[Condition]) -> list[list[Hit]]:
        qfilter = edge_filter(conditions) if conditions else None
        out: list[list[Hit]] = []
        for start in range(0, len(vectors), QUERY_CHUNK):
            requests = [qe.QueryRequest(limit=int(lim), query=qe.Query.Nearest(v), filter=qfilter,
                                        with_payload=[ITEM_ID], params=self._params(int(lim)))
                        for v, lim in zip(vectors[start:start + QUERY_CHUNK].tolist(), limits[start:start + QUERY_CHUNK])]
            for hits in self.shard.query_batch(qe.QueryBatchRequest(requests)):
                out.append([(p.payload[ITEM_ID], float(p.score)) for p in hits if p.payload])
        return out

    def _point_of(self, item_id: Any) -> int | None:
        # item_id has a payload index, so this is a lookup, not a scan.
        records, _ = self.shard.scroll(qe.ScrollRequest(limit=1, with_payload=False, filter=qe.Filter(
            must=[qe.FieldCondition(key=ITEM_ID, match=qe.MatchValue(item_id))])))
        return int(records[0].id) if records else None

    def vector_of(self, item_id: Any) -> np.ndarray | None:
        point = self._point_of(item_id)
        if point is None:
            return None
        (record,) = self.shard.retrieve([point], with_payload=False, with_vector=True)
        vector = record.vector
        return np.asarray(vector[""] if isinstance(vector, dict) else vector, dtype=np.float32)

    def count(self) -> int:
        # The shard's own tally (no deletes ever happen here); an exact count request scans segments.
        return int(self.shard.info().points_count)

    def item_ids(self) -> list[Any]:
        pairs: list[tuple[int, Any]] = []
        offset = None
        while True:
            records, offset = self.shard.scroll(qe.ScrollRequest(offset=offset, limit=SCROLL_BATCH,
                                                                 with_payload=[ITEM_ID]))
            pairs.extend((int(r.id), (r.payload or {}).get(ITEM_ID)) for r in records)
            if offset is None:
                return [item for _, item in sorted(pairs)]

    def close(self) -> None:
        self.shard.close()


def edge_filter(conditions: Sequence[Condition]) -> qe.Filter:
    must: list[Any] = []
    for c in conditions:
        if c.values is not None:
            match = qe.MatchValue(c.values[0]) if len(c.values) == 1 else qe.MatchAny(list(c.values))
            must.append(qe.FieldCondition(key=c.field, match=match))
        else:
            must.append(qe.FieldCondition(key=c.field, range=qe.RangeFloat(**dict(c.bounds or ()))))
    return qe.Filter(must=must)
