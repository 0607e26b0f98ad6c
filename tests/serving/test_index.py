"""The index layer, one suite for every backend on this machine: Qdrant local mode, qdrant-edge, the
server code against qdrant-client's in-memory engine, and a real server when QDRANT_URL is set.

Answers are compared with exact numpy search on the same vectors. Real engines; nothing is mocked.
"""
from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.serving.index import (EMBEDDED, BadQuery, IndexInUse, IndexSettings, VectorIndex, catalog_payloads,
                                 create_index, open_index)

N, DIM = 300, 16
GENRES = ["action", "comedy", "drama", "horror"]

BACKENDS = ["qdrant-local", "qdrant-edge", "qdrant-server-memory"]
if os.environ.get("QDRANT_URL"):
    BACKENDS.append("qdrant-server")


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def catalog(n: int = N, string_ids: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "item_id": [f"i{i:04d}" for i in range(n)] if string_ids else np.arange(1000, 1000 + n),
        "genres": [list(rng.choice(GENRES, rng.integers(1, 3), replace=False)) for _ in range(n)],
        "year": rng.integers(1950, 2000, n).astype(float),
        "brand": rng.choice(["a", "b", "c"], n),
    })


FEATURES = {"categorical": ["brand"], "numeric": ["year"], "multi": ["genres"]}


@pytest.fixture(params=BACKENDS)
def make(request, tmp_path: Path) -> Iterator[Callable[..., VectorIndex]]:
    """make(settings, create=True|False) -> an index of the backend under test (same storage each call)."""
    yield from _maker(request.param, tmp_path)


@pytest.fixture(params=EMBEDDED)
def make_embedded(request, tmp_path: Path) -> Iterator[Callable[..., VectorIndex]]:
    """`make` for the backends that keep their storage in a folder of their own."""
    yield from _maker(request.param, tmp_path)


def _maker(backend: str, tmp_path: Path) -> Iterator[Callable[..., VectorIndex]]:
    opened: list[VectorIndex] = []
    client = None
    collection = f"t_{uuid.uuid4().hex[:8]}"
    if backend == "qdrant-server-memory":
        from qdrant_client import QdrantClient
        client = QdrantClient(location=":memory:")
    elif backend == "qdrant-server":
        from flows.serving.index.qdrant_server import server_client
        client = server_client()

    def _make(settings: IndexSettings, create: bool = True) -> VectorIndex:
        real = "qdrant-server" if backend.startswith("qdrant-server") else backend
        factory = create_index if create else open_index
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # local mode: "payload indexes have no effect"
            index = factory(real, settings, path=tmp_path / "index", collection=collection, client=client)
        opened.append(index)
        return index

    _make.backend = backend  # type: ignore[attr-defined]
    yield _make
    if backend == "qdrant-server" and client is not None:
        client.delete_collection(collection)
    for index in opened:
        try:
            index.close()
        except Exception:   # closed by the test already
            pass


def built(make, n: int = N, string_ids: bool = False, **settings) -> tuple[VectorIndex, pd.DataFrame, np.ndarray]:
    items = catalog(n, string_ids)
    fields, payloads = catalog_payloads(items, FEATURES)
    vectors = unit(n, DIM, 2)
    s = IndexSettings(dim=DIM, fields=fields, id_kind="keyword" if string_ids else "integer", upsert_batch=64, **settings)
    index = make(s)
    index.build(vectors, items["item_id"].tolist(), payloads)
    return index, items, vectors


def exact(vectors: np.ndarray, queries: np.ndarray, ids: list, k: int, keep=None) -> list[list]:
    scores = queries @ vectors.T
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")
        out.append([ids[j] for j in order if keep is None or keep(j)][:k])
    return out


def overlap(got: list, want: list) -> float:
    return len(set(got) & set(want)) / max(1, len(want))


def test_build_count_ids_and_search_match_exact_search(make) -> None:
    index, items, vectors = built(make)
    ids = items["item_id"].tolist()
    assert index.count() == N and index.item_ids() == ids
    queries = unit(20, DIM, 3)
    hits = index.search(queries, 10)
    want = exact(vectors, queries, ids, 10)
    assert np.mean([overlap([i for i, _ in h], w) for h, w in zip(hits, want)]) >= 0.95
    for h, q in zip(hits, queries):
        scores = [s for _, s in h]
        assert scores == sorted(scores, reverse=True)
        # cosine of unit vectors: the score is the dot product
        assert scores[0] == pytest.approx(float(np.max(vectors @ q)), abs=1e-3)
    (self_hit,) = index.search(vectors[[5]], 1)
    assert self_hit[0][0] == ids[5] and self_hit[0][1] == pytest.approx(1.0, abs=1e-4)


def test_exclusions_are_dropped_and_still_k_answers(make) -> None:
    index, items, vectors = built(make)
    ids = items["item_id"].tolist()
    queries = unit(3, DIM, 4)
    brute = exact(vectors, queries, ids, N)
    seen = [set(brute[0][:2]) | {"not-in-catalog"}, set(), set(brute[2][:250])]
    got = index.search(queries, 5, exclude=seen)
    for g, b, s in zip(got, brute, seen):
        assert [i for i, _ in g] == [i for i in b if i not in s][:5]
    (rest,) = index.search(queries[[2]], 100, exclude=[seen[2]])
    assert len(rest) == N - 250                      # more than what is left: all of it, once


@pytest.mark.parametrize("spec, keep", [
    ({"genres": "comedy"}, lambda r: "comedy" in r.genres),
    ({"genres": ["horror", "drama"], "brand": "a"}, lambda r: ({"horror", "drama"} & set(r.genres)) and r.brand == "a"),
    ({"year": {"gte": 1990, "lt": 1995}}, lambda r: 1990 <= r.year < 1995),
    ({"year": 1971}, lambda r: r.year == 1971),
])
def test_filters_match_exact_filtered_search(make, spec, keep) -> None:
    index, items, vectors = built(make)
    ids = items["item_id"].tolist()
    rows = list(items.itertuples())
    queries = unit(5, DIM, 5)
    want = exact(vectors, queries, ids, 10, keep=lambda j: bool(keep(rows[j])))
    got = index.search(queries, 10, filter=spec)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        assert overlap([i for i, _ in g], w) >= 0.9
        assert all(keep(rows[ids.index(i)]) for i, _ in g)


def test_bad_filters_and_queries_are_bad_query(make) -> None:
    index, _, _ = built(make, n=40)
    q = unit(1, DIM, 6)
    with pytest.raises(BadQuery, match=r"unknown filter field 'colour'; filterable fields: brand, genres, year"):
        index.search(q, 5, filter={"colour": "red"})
    with pytest.raises(BadQuery, match=r"'brand': expected a string, got 3"):
        index.search(q, 5, filter={"brand": 3})
    with pytest.raises(BadQuery, match=r"'year': a range takes gte/gt/lte/lt"):
        index.search(q, 5, filter={"year": {"from": 1990}})
    with pytest.raises(BadQuery, match="k must be at least 1"):
        index.search(q, 0)
    with pytest.raises(BadQuery, match=r"shape \(n, 16\)"):
        index.search(unit(1, 8, 6), 5)


def test_similar_items_leave_the_item_out(make) -> None:
    index, items, vectors = built(make, string_ids=True)
    ids = items["item_id"].tolist()
    got = index.similar(ids[7], 5)
    want = exact(vectors, vectors[[7]], ids, 6)[0][1:]
    assert ids[7] not in [i for i, _ in got] and overlap([i for i, _ in got], want) >= 0.8
    assert all(isinstance(i, str) for i, _ in got)
    assert all(items.set_index("item_id").loc[i, "brand"] == "b" for i, _ in index.similar(ids[7], 5, filter={"brand": "b"}))
    with pytest.raises(BadQuery, match=r"item_id 'nope' is not in the index"):
        index.similar("nope", 5)


def test_upsert_adds_new_items_and_replaces_known_ones(make) -> None:
    index, items, vectors = built(make, n=100)
    new = unit(3, DIM, 7)
    points = index.upsert([5000, 5001, 1003], new, [{"genres": ["kids"]}, {}, {"brand": "z"}])
    assert points == [100, 101, 3] and index.count() == 102
    (hit,) = index.search(new[[0]], 1)
    assert hit[0][0] == 5000
    (hit,) = index.search(new[[2]], 1, filter={"brand": "z"})
    assert hit[0][0] == 1003
    assert np.allclose(index.vector_of(5001), new[1], atol=1e-5)


def test_searches_after_upserts_see_them_as_a_fresh_read_would(make) -> None:
    """The search arrays a warm index keeps are updated by each upsert (not re-read: a large POST
    /items writes in chunks between reads); filters and exclusions see the new payloads."""
    index, items, vectors = built(make, n=100)
    queries = unit(6, DIM, 11)
    index.search(queries, 5)
    index.search(queries, 5, filter={"genres": "kids"})          # caches warm before the writes
    new = unit(4, DIM, 12)
    index.upsert([5000, 5001], new[:2], [{"genres": ["kids"]}, {}])
    index.upsert([5002, 1003], new[2:], [{"genres": ["kids"]}, {"genres": ["docs"]}])
    ids = items["item_id"].tolist() + [5000, 5001, 5002]
    everything = np.vstack([vectors, new[:3]])
    everything[3] = new[3]
    genres = items["genres"].tolist() + [["kids"], [], ["kids"]]
    genres[3] = ["docs"]
    for query_filter, keep in ((None, None), ({"genres": "kids"}, lambda j: "kids" in genres[j])):
        hits = index.search(np.vstack([queries, new]), 5, filter=query_filter)
        want = exact(everything, np.vstack([queries, new]), ids, 5, keep)
        assert np.mean([overlap([i for i, _ in h], w) for h, w in zip(hits, want)]) >= 0.95, query_filter
    assert index.search(new[[3]], 1)[0][0][0] == 1003
    assert index.search(new[[3]], 1, exclude=[{1003}])[0][0][0] != 1003


def test_embedded_storage_reopens_and_is_single_process(make_embedded) -> None:
    index, items, vectors = built(make_embedded, n=60)
    settings = index.settings
    with pytest.raises(IndexInUse, match="the index storage is open in another process"):
        make_embedded(settings, create=False)
    index.close()
    again = make_embedded(settings, create=False)
    assert again.count() == 60 and again.item_ids() == items["item_id"].tolist()
    (hit,) = again.search(vectors[[9]], 1)
    assert hit[0][0] == items["item_id"][9]


def test_payloads_carry_the_catalog_fields_typed() -> None:
    items = catalog(4).assign(year=[1990.0, np.nan, np.inf, 2001.0], brand=["a", None, "b", "c"])
    fields, payloads = catalog_payloads(items, FEATURES)
    assert fields == {"brand": "keyword", "year": "float", "genres": "keyword"}
    assert payloads[1] == {"item_id": 1001, "genres": list(items["genres"][1])}     # missing values left out
    assert payloads[0]["year"] == 1990.0 and "year" not in payloads[2] and type(payloads[0]["item_id"]) is int


def test_local_batch_top_k_takes_the_k_best_and_orders_ties_by_point() -> None:
    """The batch top-k (torch) returns each row's k best scores, best first, equal scores lowest
    point first (torch.topk leaves the order of ties open), as the one-row `_top` orders them."""
    import torch

    from flows.serving.index.arrays import _top_rows

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=(40, 300)).astype(np.float32)    # many ties
    scores[0, :] = 1.0                                                  # a row of nothing but ties
    scores[1, 10:] = -np.inf                                            # fewer finite scores than k
    for k in (1, 7, 50, 300, 500):
        values, top = _top_rows(torch.from_numpy(scores), k)
        assert top.shape == (40, min(k, 300))
        assert np.array_equal(values, np.take_along_axis(scores, top, axis=1))
        assert np.array_equal(values, -np.sort(-scores, axis=1)[:, :min(k, 300)])     # the k best
        for vals, points in zip(values, top):
            assert [(-v, p) for v, p in zip(vals, points)] == sorted((-v, p) for v, p in zip(vals, points))
    assert _top_rows(torch.from_numpy(scores), 300)[1][0].tolist() == list(range(300))


def test_a_private_copy_keeps_its_writes_in_memory(make_embedded) -> None:
    """A reader's private copy (thrown away on close) answers with the items upserted into it, and
    its files are left as copied: local mode no longer commits each point to SQLite there."""
    index, items, vectors = built(make_embedded, n=60)
    index.keep_writes_in_memory()
    new = unit(1, DIM, 9)
    fields, payloads = catalog_payloads(catalog(61).tail(1).assign(item_id=[7777]), FEATURES)
    index.upsert([7777], new, payloads)
    assert index.search(new, 1)[0][0][0] == 7777 and index.count() == 61
    settings = index.settings
    index.close()
    again = make_embedded(settings, create=False)
    expected = 60 if make_embedded.backend == "qdrant-local" else 61   # qdrant-edge: its upserts cost little
    assert again.count() == expected
