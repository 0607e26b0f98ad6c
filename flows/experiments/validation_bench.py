"""Ad-hoc benchmark (not a test): validation time and peak RSS on the demo and on a large table.

    python -m flows.experiments.validation_bench --demo data/ingested            # the demo tables as ingested
    python -m flows.experiments.validation_bench --rows 10000000                 # synthetic interactions, 10M rows

Each run validates in a fresh GX context and docs folder under --work; peak RSS is the process's
(ru_maxrss), so run one measurement per process.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.memory import high_water_mb


def synthetic(out: Path, rows: int, users: int = 100_000, items: int = 20_000, seed: int = 0) -> Path:
    """Contract tables with `rows` interactions, written in row groups (never all in memory at once)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": np.arange(users, dtype=np.int64),
                             "gender": rng.choice(["F", "M"], users)}), out / "users.parquet")
    pq.write_table(pa.table({"item_id": np.arange(items, dtype=np.int64),
                             "year": rng.integers(1950, 2020, items).astype(np.float64)}), out / "items.parquet")
    ts = pa.timestamp("us", tz="UTC")
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", ts),
                        ("rating", pa.float64()), ("weight", pa.float64())])
    start = np.datetime64("2020-01-01T00:00:00", "us").astype(np.int64)
    with pq.ParquetWriter(out / "interactions.parquet", schema) as w:
        for lo in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - lo)
            w.write_table(pa.table({
                "user_id": rng.integers(0, users, n), "item_id": rng.integers(0, items, n),
                "timestamp": pa.array(start + rng.integers(0, 3 * 365 * 86400 * 10**6, n), ts),
                "rating": rng.integers(1, 6, n).astype(np.float64), "weight": np.ones(n)}, schema=schema))
    from flows.sources.normalize import logs_schema
    pq.write_table(logs_schema(pa.int64(), pa.int64()).empty_table(), out / "ranking_logs.parquet")
    (out / "schema.json").write_text(json.dumps({
        "user_id_dtype": "int64", "item_id_dtype": "int64",
        "user_features": {"categorical": ["gender"], "numeric": [], "multi": []},
        "item_features": {"categorical": [], "numeric": ["year"], "multi": []},
        "has_rating": True, "ranking_logs": "none", "source": "bench"}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, help="an ingested folder to validate as it is")
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--chunk-rows", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/towerflow-validate-bench"))
    args = ap.parse_args()
    from flows.stages.validate import validate
    from validation.params import ValidateParams

    shutil.rmtree(args.work / "gx", ignore_errors=True)
    data = args.demo
    if data is None:
        t0 = time.perf_counter()
        data = synthetic(args.work / "ingested", args.rows)
        print(f"generated {args.rows} rows in {time.perf_counter() - t0:.1f}s", flush=True)
    rss0 = high_water_mb()
    cfg = ValidateParams(chunk_rows=args.chunk_rows, rating_range=(1, 5), rating_mean=(2.5, 4.5))
    t0 = time.perf_counter()
    summary = validate(cfg, data, args.work / "docs", args.work / "validation.json", args.work / "gx")
    seconds = time.perf_counter() - t0
    peak = high_water_mb()
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb_before": round(rss0),
                      "peak_rss_mb": round(peak), "success": summary["success"],
                      "tables": {t: {k: s.get(k) for k in ("rows", "batches", "evaluated")}
                                 for t, s in summary["tables"].items()}}, indent=1))


if __name__ == "__main__":
    main()
