"""The index benchmark (`towerflow bench --index-items N`): each embedded backend built and measured
in its own process on a synthetic catalog; local mode left out above its size limit, and said so."""
from __future__ import annotations

from flows.experiments.index_bench import bench_for_catalog


def test_each_embedded_backend_is_built_measured_and_recalls() -> None:
    results = bench_for_catalog(1500, repeats=5, n_queries=20)
    assert [r["backend"] for r in results] == ["qdrant-local", "qdrant-edge"]
    for r in results:
        assert "error" not in r, r
        assert r["n_items"] == 1500 and r["warmup"]["queries"] == 20
        assert r["recall_at_100"] >= 0.95
        assert 0 < r["query_k10"]["p50_ms"] <= r["query_k10"]["p99_ms"]


def test_local_mode_is_skipped_above_its_limit_with_the_reason() -> None:
    results = bench_for_catalog(1500, local_max=1000, repeats=5, n_queries=20)
    assert [r["backend"] for r in results] == ["qdrant-edge", "qdrant-local"]
    assert "recall_at_100" in results[0]
    assert results[1]["skipped"].startswith("above 1000 items")
