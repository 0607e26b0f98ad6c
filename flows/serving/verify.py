"""What a bundle must pass before it may go live: sane vectors, every item indexed under its own id,
and ANN answers close enough to exact search for real users.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from flows.errors import PublishError
from flows.serving.index.base import VectorIndex

RECALL_K = 100
EXACT_CHUNK = 32          # queries per exact matmul: bounds memory at 1M items (32 x 1M floats)
VECTOR_ATOL = 1e-4        # stored vectors come back normalized as float32 by Qdrant


def check_vectors(vectors: np.ndarray, ids: Sequence[Any], n_items: int, dim: int) -> None:
    """One finite, non-zero vector per item, ids unique: a NaN model stops here."""
    if vectors.shape != (n_items, dim) or len(ids) != n_items:
        raise PublishError(f"the item tower returned shape {vectors.shape} for {n_items} items of dim {dim}")
    bad = ~np.isfinite(vectors).all(axis=1) | (np.abs(vectors).sum(axis=1) == 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise PublishError(f"{int(bad.sum())} of {n_items} item vectors are zero or not finite (first: item_id "
                           f"{ids[first]!r}): the model is broken (nan loss in training?)")
    if len(set(ids)) != len(ids):
        seen: set[Any] = set()
        for i in ids:
            if i in seen:
                raise PublishError(f"item_id {i!r} appears more than once in the catalog")
            seen.add(i)


def unit(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def exact_top_k(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the k best items per query by cosine, best first; items/queries unit-length."""
    k = min(k, len(items))
    rows, scores = [], []
    for start in range(0, len(queries), EXACT_CHUNK):
        s = queries[start:start + EXACT_CHUNK] @ items.T                       # (q, n)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]                        # (q, k) unordered
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        rows.append(np.take_along_axis(top, order, axis=1))
        scores.append(np.take_along_axis(top_s, order, axis=1))
    return np.concatenate(rows), np.concatenate(scores)


def ann_recall(index: VectorIndex, vectors: np.ndarray, ids: Sequence[Any], queries: np.ndarray,
               k: int = RECALL_K) -> float:
    """Mean share of the exact top-k that the index returns. A returned item scoring as high as the
    exact k-th one counts too: with ties, either of two equal items is a right answer."""
    items = unit(vectors)
    queries = unit(queries)
    k = min(k, len(ids))
    _, exact_scores = exact_top_k(items, queries, k)
    row_of = {item: row for row, item in enumerate(ids)}
    hits = index.search(queries, k)
    recalls = []
    for q, got, kth in zip(queries, hits, exact_scores[:, -1]):
        rows = [row_of[i] for i, _ in got if i in row_of]
        good = int((items[rows] @ q >= kth - 1e-5).sum()) if rows else 0
        recalls.append(min(good, k) / k)
    return float(np.mean(recalls)) if recalls else 1.0


def verify_index(index: VectorIndex, vectors: np.ndarray, ids: Sequence[Any], queries: np.ndarray,
                 *, min_recall: float, sample: int, max_search_ef: int | None = None) -> dict[str, Any]:
    """Raise PublishError unless the index holds exactly these items and answers well; returns
    the figures that bundle.json records. The index's search_ef is doubled, up to max_search_ef
    (None: not raised), until the recall check passes; the index keeps the ef that passed
    (figures["search_ef"])."""
    max_search_ef = max(max_search_ef or 0, index.settings.search_ef)
    t0 = time.perf_counter()
    n = len(ids)
    count = index.count()
    if count != n:
        raise PublishError(f"the index holds {count} points, the catalog {n} items")
    stored = index.item_ids()
    if stored != list(ids):
        first = next(p for p, (a, b) in enumerate(zip(stored, ids)) if a != b)
        raise PublishError(f"point {first} holds item_id {stored[first]!r}, expected {ids[first]!r}")
    picks = np.unique(np.linspace(0, n - 1, min(sample, n)).round().astype(int))
    expected = unit(vectors)
    for p in picks.tolist():
        got = index.vector_of(ids[p])
        diff = np.inf if got is None else float(np.max(np.abs(got - expected[p])))
        if not diff <= VECTOR_ATOL:
            raise PublishError(f"the stored vector of item_id {ids[p]!r} differs from the encoded one "
                               f"(max abs difference {diff:.3g})")
    # The search breadth is a query-time setting: when the graph answers these users worse than
    # min_recall, search wider (doubling up to max_search_ef) before refusing. Queries unlike the
    # items (user vectors of a model trained briefly on a 200k catalog) needed it: 0.883 at ef 128.
    tried: dict[int, float] = {}
    ef = index.settings.search_ef
    while True:
        index.settings = replace(index.settings, search_ef=ef)
        recall = tried[ef] = ann_recall(index, vectors, ids, queries)
        if recall >= min_recall or ef >= max_search_ef:
            break
        ef = min(2 * ef, max_search_ef)
    figures = {"count": count, "ids_match": True, "vectors_finite": True, "vectors_checked": len(picks),
               "recall_queries": len(queries), f"recall_at_{RECALL_K}": round(recall, 4), "min_recall": min_recall,
               "search_ef": ef, "recall_by_search_ef": {str(e): round(r, 4) for e, r in tried.items()},
               "seconds": round(time.perf_counter() - t0, 3)}
    if recall < min_recall:
        raise PublishError(f"ANN recall@{RECALL_K} {recall:.3f} < publish.min_recall {min_recall} on {len(queries)} "
                           f"users at search_ef {ef}: raise publish.max_search_ef / hnsw_ef_construct / hnsw_m "
                           "or turn quantization off")
    return figures
