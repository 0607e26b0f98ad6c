"""`python -m flows.experiments.features_bench`: online feature latency and materialization time of a feature store.

Point it at a COPY of a materialized store (it rewrites the online rows): e.g.
    cp -r data/feast data/features /tmp/fs/ && \\
    python -m flows.experiments.features_bench --feast-dir /tmp/fs/feast --features-dir /tmp/fs/features \\
        --schema data/ingested/schema.json --out /tmp/fs/feature_bench.json [--online redis]
Measures, after one warm-up call each:
- `online_user_features` (what `towerflow recommend` calls) for 1 user and for a batch of 1,000
  distinct users (all of them when the store has fewer), p50/p99 over `--repeats` calls (users drawn from the store's user_static/user_history source);
- the same through a one-shot answer's reader of a SQLite store (`one_shot_reader_*`: sqlite3, no Feast);
- Feast `materialize` of every online view into a freshly emptied online store (the write half of the
  materialize stage), over the sources' full time range.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.definitions import SOURCE_FILES, TIMESTAMP_FIELD, USER_HISTORY_FV, USER_KEY
from flows.experiments.machine import machine


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50_ms": round(1000 * statistics.median(ordered), 3), "p99_ms": round(1000 * p99, 3),
            "n": len(ordered)}


def time_calls(call, repeats: int) -> dict[str, float]:  # noqa: ANN001
    """Latency percentiles of `repeats` calls after one warm-up call (it loads registries, caches)."""
    call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def _time_range(features_dir: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Earliest and one second past the latest event time over every offline source."""
    lows, highs = [], []
    for name in SOURCE_FILES.values():
        stamps = pq.read_table(features_dir / name, columns=[TIMESTAMP_FIELD]).column(TIMESTAMP_FIELD)
        lows.append(pc.min(stamps).as_py())
        highs.append(pc.max(stamps).as_py())
    return pd.Timestamp(min(lows)), pd.Timestamp(max(highs)) + pd.Timedelta(seconds=1)


def bench(feast_dir: Path, features_dir: Path, schema: dict, online: str, repeats: int,
          batch: int, seed: int = 0) -> dict[str, Any]:
    from features.definitions import build_repo
    from features.online import online_user_features
    from features.online_sqlite import SqliteUserRows
    from features.store import open_store, reset_online

    users = pq.read_table(features_dir / SOURCE_FILES[USER_HISTORY_FV], columns=[USER_KEY])
    ids = pd.unique(users.column(USER_KEY).to_numpy())
    rng = np.random.default_rng(seed)
    one = [ids[int(rng.integers(len(ids)))]]
    # Distinct users (online_user_features looks each id up once): all of them when fewer exist.
    many = list(rng.choice(ids, size=min(batch, len(ids)), replace=False))
    one, many = [v.item() if hasattr(v, "item") else v for v in one], \
        [v.item() if hasattr(v, "item") else v for v in many]

    reset_online(feast_dir, features_dir, online)    # empty online store of the chosen kind
    store = open_store(feast_dir, features_dir, online)
    store.apply(build_repo(schema, features_dir).objects())   # (re)creates the online tables
    start, end = _time_range(features_dir)
    started = time.perf_counter()
    store.materialize(start_date=start.to_pydatetime(), end_date=end.to_pydatetime())
    materialize_s = time.perf_counter() - started

    store = open_store(feast_dir, features_dir)      # as serving opens it
    got = online_user_features(store, schema, many)
    if not got["known"].all():
        raise RuntimeError(f"{int((~got['known']).sum())} of {len(many)} sampled users are unknown online")
    result = {
        "online_store": online,
        "users_in_store": len(ids),
        "materialize_seconds": round(materialize_s, 3),
        "online_1_user": time_calls(lambda: online_user_features(store, schema, one), repeats),
        "online_batch_users": len(many),
        "online_batch": time_calls(lambda: online_user_features(store, schema, many),
                                    max(5, repeats // 10)),
    }
    # A one-shot `towerflow recommend` reads a SQLite store without Feast (features/online_sqlite.py)
    reader = SqliteUserRows.open(feast_dir, features_dir)
    if reader is not None:
        pd.testing.assert_frame_equal(online_user_features(reader, schema, many), got)
        result["one_shot_reader_1_user"] = time_calls(lambda: online_user_features(reader, schema, one), repeats)
        result["one_shot_reader_batch"] = time_calls(lambda: online_user_features(reader, schema, many),
                                                     max(5, repeats // 10))
    return {**result, "machine": machine(speed=False)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feast-dir", type=Path, required=True, help="a copy of paths.feast")
    parser.add_argument("--features-dir", type=Path, required=True, help="paths.features (read only)")
    parser.add_argument("--schema", type=Path, required=True, help="ingested schema.json")
    parser.add_argument("--online", choices=["sqlite", "redis"], default="sqlite",
                        help="online store to fill and read (redis: $REDIS_URL)")
    parser.add_argument("--repeats", type=int, default=200, help="1-user calls (batch: a tenth)")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = bench(args.feast_dir, args.features_dir, json.loads(args.schema.read_text()),
                   args.online, args.repeats, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
