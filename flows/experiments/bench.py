"""`towerflow bench` (`make bench`): time every stage on the demo, training throughput (ours beside a
minimal two-tower of the same sizes), and the serving speed.

Runs in a temporary copy of the project (so the workspace's DVC outputs and dvc.lock are untouched),
reusing the workspace's demo cache, and writes the figures to a JSON file (default reports/bench.json).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from flows.experiments.features_bench import bench as feature_bench
from flows.experiments.machine import host_speed, machine

PROJECT_FILES = ("flows", "features", "models", "validation", "dvc.yaml", "params.yaml")


def copy_project(root: Path, work: Path) -> None:
    """The project's code and config into work (a temporary project the benchmarks run in)."""
    for name in PROJECT_FILES:
        src = root / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)


def bench(root: Path, out: Path, overrides: list[str], repeats: int = 50, index_items: int = 0) -> dict[str, Any]:
    """index_items > 0: also the embedded index backends on a synthetic catalog of that size."""
    from flows.experiments.index_bench import bench_for_catalog
    from flows.params import load_params
    from flows.stages.registry import STAGES, run_stage

    host = machine()                     # the host's speed before anything runs, and again at the end
    with tempfile.TemporaryDirectory(prefix="towerflow-bench-") as tmp:
        work = Path(tmp)
        copy_project(root, work)
        params = load_params(work / "params.yaml",
                             [f"paths.cache={(root / '.cache/towerflow').resolve()}", *overrides])
        stages: dict[str, float] = {}
        summaries: dict[str, Any] = {}
        for name in STAGES:
            t0 = time.perf_counter()
            summaries[name] = run_stage(name, params, work)
            stages[name] = round(time.perf_counter() - t0, 2)
            print(f"{name:<12} {stages[name]:7.2f}s", flush=True)
        paths = params.paths.resolved(work)
        train_metrics = json.loads((paths.model / "train_metrics.json").read_text())
        metrics = json.loads((paths.reports / "metrics.json").read_text())
        # ours against the minimal two-tower of the same sizes, on this run's refit stream
        throughput = _training(paths, params)
        latency = _serving(work, repeats)
        # last: it rewrites the (temporary copy's) online store to time a full materialization
        features = feature_bench(paths.feast, paths.features,
                                 json.loads((paths.ingested / "schema.json").read_text()),
                                 params.features.online_store, repeats, 1000)

    result = {
        "machine": {**host, "speed_at_end": host_speed()},
        "overrides": overrides,
        "stage_seconds": stages,
        "total_seconds": round(sum(stages.values()), 2),
        "train": train_metrics,
        "train_throughput": throughput,
        "metrics": metrics,
        "recommend": latency,
        "features": features,
        "materialize": summaries.get("materialize"),
        # after the rest (its own processes): the catalog-size figures of the embedded indexes
        "index": bench_for_catalog(index_items) if index_items else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return result


def _training(paths, params, rounds: int = 3) -> dict[str, Any]:  # noqa: ANN001
    """Training examples/s of ours and of the minimal two-tower, alternated (flows/experiments/train_bench.py)."""
    from flows.experiments.train_bench import compare, stream_at

    with tempfile.TemporaryDirectory(prefix="towerflow-bench-stream-") as spill:
        stream, config = stream_at(paths.samples / "full.parquet", paths.training, paths.ingested / "schema.json",
                                   params.model, params.train, Path(spill))
        return compare(stream, config, params.train, params.base.seed, epochs=1, rounds=rounds)


def _serving(work: Path, repeats: int) -> dict[str, Any]:
    """The warm service on the copy that just ran (flows/experiments/serve_bench.py): in-process and
    HTTP latency, batch users/s, 50 clients for 30 s, a publish under load, event to effect."""
    from flows.experiments.serve_bench import bench_service

    return bench_service(work, work / "params.yaml", repeats=max(repeats, 100))
