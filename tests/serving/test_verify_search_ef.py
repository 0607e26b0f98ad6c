"""The publish check searches wider before refusing: HNSW's search breadth (search_ef) is a query-time
setting, so an index whose graph answers the sampled users below publish.min_recall at search_ef is
tried at twice the breadth, up to publish.max_search_ef, and keeps the breadth that passed (the 10M
bench shape: recall@100 0.883 at 128, 0.917 at 256: refused with the fixed default)."""
from __future__ import annotations

import numpy as np
import pytest

from flows.errors import PublishError
from flows.serving.index import create_index
from flows.serving.index.base import IndexSettings
from flows.serving.verify import verify_index


@pytest.fixture(scope="module")
def sparse_graph(tmp_path_factory):  # noqa: ANN201
    """45k points of 64 dims (above qdrant's 10 MB full-scan threshold, so the graph answers) in a graph
    built with 2 edges a node: its recall@100 climbs with the search breadth (0.04 at 100, 0.11 at 400)."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(45_000, 64)).astype(np.float32)
    queries = rng.normal(size=(50, 64)).astype(np.float32)
    ids = list(range(1, len(vectors) + 1))
    settings = IndexSettings(dim=64, hnsw_m=2, hnsw_ef_construct=4, search_ef=100)
    index = create_index("qdrant-edge", settings, path=tmp_path_factory.mktemp("edge") / "index")
    index.build(vectors, ids, [{} for _ in ids])
    yield index, vectors, ids, queries
    index.close()


def test_a_narrow_search_is_widened_until_the_recall_check_passes(sparse_graph):  # noqa: ANN001
    index, vectors, ids, queries = sparse_graph
    index.settings = IndexSettings(dim=64, hnsw_m=2, hnsw_ef_construct=4, search_ef=100)
    figures = verify_index(index, vectors, ids, queries, min_recall=0.09, sample=4, max_search_ef=1600)
    assert figures["search_ef"] in (200, 400, 800) and index.settings.search_ef == figures["search_ef"]
    tried = figures["recall_by_search_ef"]
    assert tried["100"] < 0.09 <= tried[str(figures["search_ef"])]
    assert list(tried) == [str(e) for e in (100, 200, 400, 800) if e <= figures["search_ef"]]


def test_without_room_to_widen_the_check_refuses_and_says_how(sparse_graph):  # noqa: ANN001
    index, vectors, ids, queries = sparse_graph
    index.settings = IndexSettings(dim=64, hnsw_m=2, hnsw_ef_construct=4, search_ef=100)
    with pytest.raises(PublishError, match="at search_ef 100: raise publish.max_search_ef"):
        verify_index(index, vectors, ids, queries, min_recall=0.09, sample=4, max_search_ef=100)
