"""Embedded index backends on a synthetic catalog: build time, memory, query latency, ANN recall.

    bench_indexes(100_000)                      # every embedded backend, 64-d, in fresh processes
    python -m flows.experiments.index_bench 100000 --backends qdrant-edge

Each backend runs in its own process so its memory is its own. The catalog is a Gaussian mixture
(sqrt(n) clusters): trained item towers give clustered vectors, and isotropic noise would make
every ANN index look worse than it is on real embeddings. Recall@100 is against exact numpy search
on the same vectors, for query vectors drawn like users (near clusters, not copies of items).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from features.memory import high_water_mb
from flows.experiments.features_bench import time_calls

EMBEDDED = ("qdrant-local", "qdrant-edge")
CATEGORIES = [f"c{i:02d}" for i in range(20)]
NATIVE_FILTER_MAX = 20000    # local mode's own filter scans every point in Python: ~1 s per query at 100k
# Local mode upserts ~1k points/s here (228 s per 200k) and publish uses it up to 20k items:
# `towerflow bench` measures it up to this size and says it skipped it above.
LOCAL_BENCH_MAX = 100_000


def synthetic(n: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(2, int(np.sqrt(n))), dim)).astype(np.float32)
    items = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    queries = centers[rng.integers(0, len(centers), n_queries)] + 0.7 * rng.normal(size=(n_queries, dim)).astype(np.float32)
    payloads = [{"category": CATEGORIES[i % len(CATEGORIES)], "year": float(1950 + i % 70)} for i in range(n)]
    return items, queries, payloads


def _rss_mb() -> float:
    import psutil
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def run_one(backend: str, n: int, dim: int, repeats: int, n_queries: int, seed: int, folder: Path,
            settings: dict[str, Any]) -> dict[str, Any]:
    """One backend in this process: build, reopen, latency, recall (what `bench_indexes` collects)."""
    from flows.serving.index import IndexSettings, create_index, open_index
    from flows.serving.verify import ann_recall

    items, drawn, payloads = synthetic(n, dim, 2 * n_queries, seed)
    # A warm service has answered other users before: warm-up queries, not the measured ones.
    queries, warmup = drawn[:n_queries], drawn[n_queries:]
    ids = list(range(n))
    s = IndexSettings(dim=dim, fields={"category": "keyword", "year": "float"}, **settings)
    rss_data = _rss_mb()
    t0 = time.perf_counter()
    with create_index(backend, s, path=folder) as index:
        index.build(items, ids, payloads)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = open_index(backend, s, path=folder)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for vector in warmup:
        index.search(vector[None, :], 100)
    warmup_s = time.perf_counter() - t0
    turn = iter(range(10**9))

    def one() -> np.ndarray:   # a different user each call: a repeated query would time a warm path
        return queries[[next(turn) % len(queries)]]

    seen = [set(range(0, n, max(1, n // 50)))]      # 50 seen items, as exclude_seen sends them
    out: dict[str, Any] = {
        "backend": backend, "n_items": n, "dim": dim, "settings": s.to_dict() | {"fields": None},
        "build_s": round(build_s, 2), "open_s": round(open_s, 2),
        "warmup": {"queries": len(warmup), "seconds": round(warmup_s, 2)},
        "rss_mb": {"data": rss_data, "after_open": _rss_mb(),
                   "peak": high_water_mb()},
        "query_k10": time_calls(lambda: index.search(one(), 10), repeats),
        "query_k100": time_calls(lambda: index.search(one(), 100), repeats),
        "query_k10_exclude50": time_calls(lambda: index.search(one(), 10, exclude=seen), repeats),
        "query_k10_filter": time_calls(lambda: index.search(one(), 10, filter={"category": "c03"}), repeats),
        "batch_1000_k10_s": round(time_calls(lambda: index.search(np.tile(queries, (1000 // len(queries) + 1, 1))[:1000], 10), 1)["p50_ms"] / 1000, 3),
        "recall_at_100": round(ann_recall(index, items, ids, queries, k=100), 4),
    }
    if backend == "qdrant-local" and n <= NATIVE_FILTER_MAX:
        out["local_native_filter_k10"] = _native_filter(index, queries[:1], min(repeats, 20))
    index.close()
    return out


def _native_filter(index: Any, one: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Local mode's own filter and must_not, for comparison with over-fetching (what we do)."""
    from qdrant_client import models

    from flows.serving.index.qdrant_local import _blas

    cond = models.FieldCondition(key="category", match=models.MatchValue(value="c03"))
    must_not = models.HasIdCondition(has_id=list(range(0, 50)))
    q = one[0].tolist()

    def query(qfilter: models.Filter) -> None:
        with _blas().limit(limits=1, user_api="blas"):   # as LocalIndex searches
            index.client.query_points(index.collection, query=q, limit=10, query_filter=qfilter)

    return {"filter": time_calls(lambda: query(models.Filter(must=[cond])), repeats),
            "must_not_50_ids": time_calls(lambda: query(models.Filter(must_not=[must_not])), repeats)}


def bench_indexes(n_items: int, dim: int = 64, backends: tuple[str, ...] = EMBEDDED, repeats: int = 200,
                  n_queries: int = 200, seed: int = 0, settings: dict[str, Any] | None = None,
                  timeout_s: float = 3600) -> list[dict[str, Any]]:
    """Figures for each backend, each measured in a fresh Python process."""
    results = []
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix=f"index-bench-{backend}-") as tmp:
            cmd = [sys.executable, "-m", "flows.experiments.index_bench", str(n_items), "--one", backend,
                   "--dim", str(dim), "--repeats", str(repeats), "--queries", str(n_queries), "--seed", str(seed),
                   "--folder", str(Path(tmp) / "index"), "--settings", json.dumps(settings or {})]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                results.append({"backend": backend, "n_items": n_items, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def bench_for_catalog(n_items: int, local_max: int = LOCAL_BENCH_MAX, **kw: Any) -> list[dict[str, Any]]:
    """`bench_indexes` for `towerflow bench`: every embedded backend, local mode only up to local_max."""
    backends = EMBEDDED if n_items <= local_max else tuple(b for b in EMBEDDED if b != "qdrant-local")
    skipped = [{"backend": b, "n_items": n_items, "skipped": f"above {local_max} items (its upserts alone take "
                f"~{n_items // 1000} s; publish uses it up to publish.local_max_items)"}
               for b in EMBEDDED if b not in backends]
    return bench_indexes(n_items, backends=backends, **kw) + skipped


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n_items", type=int)
    ap.add_argument("--backends", nargs="+", default=list(EMBEDDED))
    ap.add_argument("--one", help="internal: measure this backend in this process")
    ap.add_argument("--folder", type=Path)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default="{}", help='IndexSettings overrides, JSON: {"search_ef": 64}')
    args = ap.parse_args(argv)
    settings = json.loads(args.settings)
    if args.one:
        print(json.dumps(run_one(args.one, args.n_items, args.dim, args.repeats, args.queries, args.seed,
                                 args.folder, settings)))
        return
    print(json.dumps(bench_indexes(args.n_items, args.dim, tuple(args.backends), args.repeats, args.queries,
                                   args.seed, settings), indent=2))


if __name__ == "__main__":
    main()
