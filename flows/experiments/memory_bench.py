"""Peak memory of building the training stream: whole file in memory vs streamed from disk.

    .venv/bin/python -m flows.experiments.memory_bench --rows 2000000 [--out reports/stream_memory.json]

Writes a synthetic samples file shaped like data/samples/full.parquet (ids, weight, 50 recent items,
16 hard negatives, 4 behaviour counts) into a temporary folder, then builds the TrainingStream in a
fresh process per mode and reports its peak anonymous memory (RssAnon, sampled every 20 ms) above
the process's after imports; memory-mapped pages are file-backed (the kernel can drop them and read
them back), so they are reported apart, as the peak total RSS:
- `in_memory`: pandas reads the whole file, `TrainingStream.build` (the path before streaming);
- `streamed`: `TrainingStream.from_parquet` in train.read_batch_rows batches into memory maps.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HISTORY, HARD = 50, 16


def write_samples(folder: Path, rows: int, n_users: int = 100_000, n_items: int = 20_000,
                  seed: int = 0) -> None:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pd.DataFrame({"item_id": np.arange(1, n_items + 1)}).to_parquet(folder / "items.parquet", index=False)
    writer = None
    for start in range(0, rows, 500_000):
        n = min(500_000, rows - start)

        def lists(width: int) -> pa.Array:
            flat = rng.integers(1, n_items + 1, n * width)
            return pa.ListArray.from_arrays(pa.array(np.arange(0, n * width + 1, width, dtype=np.int32)),
                                            pa.array(flat))
        total = rng.integers(0, 500, n)
        table = pa.table({
            "user_id": rng.integers(1, n_users + 1, n), "item_id": rng.integers(1, n_items + 1, n),
            "weight": np.ones(n), "recent_items": lists(HISTORY),
            "interactions_total": total, "interactions_1d": total // 50,
            "interactions_7d": total // 10, "interactions_30d": total // 3,
            "hard_negatives": lists(HARD)})
        writer = writer or pq.ParquetWriter(folder / "samples.parquet", table.schema)
        writer.write_table(table)
    writer.close()


def _rss_mib() -> tuple[float, float]:
    """(RssAnon, VmRSS) of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssAnon"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def _measure(folder: Path, mode: str, batch_rows: int) -> dict:
    """Runs in a child process: build the stream one way, report peak memory growth (MiB)."""
    import threading

    import pandas as pd
    import torch  # noqa: F401  (imports count in the baseline, not in the build)

    from models.encoding import FeatureEncoder
    from models.stream import TrainingStream

    items = pd.read_parquet(folder / "items.parquet")
    schema = {"user_id_dtype": "int64", "item_id_dtype": "int64", "user_features": {}, "item_features": {}}
    fit_rows = pd.read_parquet(folder / "samples.parquet", columns=["user_id", "item_id",
                                                                    "interactions_total", "interactions_7d"])
    encoder = FeatureEncoder.fit(schema, items, fit_rows, history_length=HISTORY)
    del fit_rows
    base_anon, base_rss = _rss_mib()
    peak = [base_anon, base_rss]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            anon, rss = _rss_mib()
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], rss)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    if mode == "in_memory":
        stream = TrainingStream.build(encoder, pd.read_parquet(folder / "samples.parquet"), items)
    else:
        stream = TrainingStream.from_parquet(encoder, folder / "samples.parquet", items,
                                             spill=folder / "spill", batch_rows=batch_rows)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return {"mode": mode, "examples": len(stream), "seconds": round(seconds, 1),
            "peak_anon_above_baseline_mib": round(peak[0] - base_anon, 1),
            "peak_rss_above_baseline_mib": round(peak[1] - base_rss, 1),
            "baseline_anon_mib": round(base_anon, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(Path(args.child[0]), args.child[1], args.batch_rows)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="towerflow-memory-") as tmp:
        write_samples(Path(tmp), args.rows)
        for mode in ("streamed", "in_memory"):
            out = subprocess.run([sys.executable, "-m", "flows.experiments.memory_bench", "--batch-rows",
                                  str(args.batch_rows), "--child", tmp, mode],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": args.rows, "batch_rows": args.batch_rows,
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
