"""`python -m flows.experiments.offline_bench`: Feast's offline stores (features.offline_store) on
generated data of N interactions: time and peak memory of materialization and the training join.

    .venv/bin/python -m flows.experiments.offline_bench --rows 1000000 --stores file duckdb spark \\
        --out reports/offline_stores.json

Generates contract tables shaped like a user's data rather than the demo's (users = N/10, items =
N/50; Zipf item popularity, heavy-tailed user activity so a few users hold thousands of events,
a year of timestamps, categorical/numeric/multi-valued features) once, writes the Feast sources once
(features/history.py: the same for every store), then per store, in a fresh process each:
`fill_online` (apply + materialize every online view into a new SQLite online store) and the
training join (`training_examples` + `item_catalog`), what the materialize stage runs. Peak memory
is the largest summed RSS of the process and its children (Spark's JVM), sampled every 50 ms. A
store may be given a time limit (--limit-s): past it the run is stopped and recorded as such.
Each result carries the load average beside it (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flows.experiments.machine import machine
from flows.experiments.scale_bench import tree_rss

SCHEMA = {"user_id_dtype": "int64", "item_id_dtype": "int64",
          "user_features": {"categorical": ["age_bucket", "gender", "occupation"], "numeric": ["age"],
                            "multi": []},
          "item_features": {"categorical": ["category"], "numeric": ["year"], "multi": ["tags"]},
          "has_rating": True, "ranking_logs": "none", "source": "offline_bench"}


def generate(folder: Path, rows: int, seed: int = 0) -> dict:
    """users/items/interactions.parquet + schema.json in folder; returns their sizes."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_users, n_items = max(10, rows // 10), max(10, rows // 50)
    folder.mkdir(parents=True, exist_ok=True)
    users = pd.DataFrame({
        "user_id": np.arange(n_users, dtype=np.int64),
        "age_bucket": rng.choice(["18-24", "25-34", "35-44", "45+"], n_users),
        "gender": rng.choice(["F", "M", "X"], n_users),
        "occupation": rng.choice([f"occ{i}" for i in range(21)], n_users),
        "age": rng.integers(18, 80, n_users),
    })
    tags = rng.integers(0, 40, (n_items, 3))
    items = pa.table({
        "item_id": pa.array(np.arange(n_items, dtype=np.int64)),
        "category": pa.array(rng.choice([f"c{i}" for i in range(30)], n_items)),
        "year": pa.array(rng.integers(1950, 2025, n_items)),
        "tags": pa.ListArray.from_arrays(np.arange(0, 3 * n_items + 1, 3),
                                         pa.array([f"t{t}" for t in tags.ravel()])),
    })
    # Heavy-tailed activity: Pareto weights (a = 1.2) give a few users thousands of events.
    activity = rng.pareto(1.2, n_users) + 1.0
    user = rng.choice(n_users, rows, p=activity / activity.sum())
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.05          # Zipf over items
    item = rng.permutation(n_items)[rng.choice(n_items, rows, p=popularity / popularity.sum())]
    start = pd.Timestamp("2024-01-01", tz="UTC").value // 1000
    stamps = start + rng.integers(0, 365 * 86_400, rows) * 1_000_000
    inter = pa.table({"user_id": pa.array(user.astype(np.int64)), "item_id": pa.array(item.astype(np.int64)),
                      "timestamp": pa.array(stamps, pa.timestamp("us", tz="UTC")),
                      "rating": pa.array(rng.integers(1, 6, rows).astype(np.float64)),
                      "weight": pa.array(np.ones(rows))})
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False), folder / "users.parquet")
    pq.write_table(items, folder / "items.parquet")
    pq.write_table(inter, folder / "interactions.parquet")
    (folder / "schema.json").write_text(json.dumps(SCHEMA))
    counts = np.bincount(user, minlength=n_users)
    return {"interactions": rows, "users": n_users, "items": n_items,
            "heaviest_user_events": int(counts.max()), "median_user_events": float(np.median(counts))}


def write_features(ingested: Path, features_dir: Path) -> dict:
    """The Feast offline sources of the default features section (the same for every store)."""
    import pandas as pd

    from features.history import write_sources
    from features.params import FeaturesParams
    from features.training_set import EXAMPLE_KEYS

    started = time.perf_counter()
    inter = pd.read_parquet(ingested / "interactions.parquet", columns=EXAMPLE_KEYS)
    sources = write_sources(FeaturesParams(), SCHEMA, pd.read_parquet(ingested / "users.parquet"),
                            pd.read_parquet(ingested / "items.parquet"), inter, features_dir)
    return {"history_rows": sources.history.num_rows, "seconds": round(time.perf_counter() - started, 2)}


def run_store(ingested: Path, work: Path, offline: str, result: Path) -> None:
    """One store's materialization and training join (in this process); writes result json."""
    import pandas as pd
    import pyarrow.parquet as pq

    from features.params import FeaturesParams
    from features.refresh import fill_online
    from features.training_set import EXAMPLE_KEYS, example_keys, item_catalog, training_examples

    features_dir, feast_dir = work / "features", work / f"feast_{offline}"
    cfg = FeaturesParams(offline_store=offline)
    inter = pd.read_parquet(ingested / "interactions.parquet", columns=EXAMPLE_KEYS)
    users, items = pd.read_parquet(ingested / "users.parquet"), pd.read_parquet(ingested / "items.parquet")
    # The sources are already on disk (write_features): rebuild only the in-memory handle the
    # stage passes along (its history table and dates), without rewriting the files.
    sources = _read_sources(features_dir, inter, users, cfg)
    timings = {}
    started = time.perf_counter()
    store, _ = fill_online(cfg, SCHEMA, inter, sources, features_dir, feast_dir)
    timings["materialize_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    examples = example_keys(inter)
    examples["split"] = "train"
    table = training_examples(store, SCHEMA, examples, sources.history, features_dir)
    catalog = item_catalog(store, SCHEMA, items, sources.now, features_dir)
    timings["join_s"] = round(time.perf_counter() - started, 2)
    pq.write_table(table, work / f"examples_{offline}.parquet")
    result.write_text(json.dumps({**timings, "examples": table.num_rows, "catalog": catalog.num_rows}))


def _read_sources(features_dir: Path, inter, users, cfg):  # noqa: ANN001, ANN202
    import pyarrow.parquet as pq

    from features.definitions import SOURCE_FILES, USER_HISTORY_FV
    from features.history import NOW_OFFSET, STATIC_LEAD, OfflineSources

    history = pq.read_table(features_dir / SOURCE_FILES[USER_HISTORY_FV])
    first, last = inter["timestamp"].min(), inter["timestamp"].max()
    return OfflineSources(history=history, static_at=first - STATIC_LEAD, now=last + NOW_OFFSET)


def measure(ingested: Path, work: Path, offline: str, limit_s: float) -> dict:
    """run_store in a fresh process; peak summed RSS of its tree, wall time, load average."""
    result = work / f"result_{offline}.json"
    result.unlink(missing_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flows.experiments.offline_bench", "--one", offline,
                             "--ingested", str(ingested), "--work", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, err = proc.communicate(timeout=limit_s)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {err.strip()[-400:]}"
    except subprocess.TimeoutExpired:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.communicate()
        status = f"stopped after {limit_s:.0f} s"
    done.set()
    watcher.join()
    out = {"store": offline, "status": status, "wall_s": round(time.perf_counter() - started, 1),
           "peak_rss_mib": round(peak[0] / 2**20), "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if status == "ok":
        out.update(json.loads(result.read_text()))
    return out


def same_examples(work: Path, stores: list[str]) -> dict[str, bool]:
    """Whether each store's examples equal the first finished store's (the join's soundness)."""
    import pyarrow.parquet as pq

    done = [s for s in stores if (work / f"examples_{s}.parquet").is_file()]
    if len(done) < 2:
        return {}
    base = pq.read_table(work / f"examples_{done[0]}.parquet")
    return {f"{s}=={done[0]}": pq.read_table(work / f"examples_{s}.parquet").equals(base) for s in done[1:]}


def bench(rows: int, stores: list[str], limit_s: float, work: Path) -> dict:
    ingested = work / "ingested"
    data = generate(ingested, rows)
    sources = write_features(ingested, work / "features")
    runs = [measure(ingested, work, s, limit_s) for s in stores]
    return {"rows": rows, "data": data, "sources": sources, "runs": runs,
            "same_examples": same_examples(work, stores),
            "machine": machine(speed=False)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--stores", nargs="+", default=["file", "duckdb", "spark"],
                        choices=["file", "duckdb", "spark"])
    parser.add_argument("--limit-s", type=float, default=3600, help="per store and size")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="json report (merged by rows)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ingested", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_store(args.ingested, args.work, args.one, args.work / f"result_{args.one}.json")
        return
    report = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    for rows in args.rows:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            result = bench(rows, args.stores, args.limit_s, Path(tmp))
        print(json.dumps(result, indent=2), flush=True)
        report[str(rows)] = result
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
