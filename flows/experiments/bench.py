"""`towerflow bench` (`make bench`): time every stage on the demo, training throughput, and recommendation latency.

Runs in a temporary copy of the project (so the workspace's DVC outputs and dvc.lock are untouched),
reusing the workspace's demo cache, and writes the figures to a JSON file (default reports/bench.json).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from flows.experiments.features_bench import bench as feature_bench, percentiles

PROJECT_FILES = ("flows", "features", "models", "validation", "dvc.yaml", "params.yaml")


def bench(root: Path, out: Path, overrides: list[str], repeats: int = 50) -> dict[str, Any]:
    from flows.params import load_params
    from flows.stages.registry import STAGES, run_stage

    with tempfile.TemporaryDirectory(prefix="towerflow-bench-") as tmp:
        work = Path(tmp)
        for name in PROJECT_FILES:
            src = root / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
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
        latency = _recommend_latency(paths, params, repeats)
        # last: it rewrites the (temporary copy's) online store to time a full materialization
        features = feature_bench(paths.feast, paths.features,
                                 json.loads((paths.ingested / "schema.json").read_text()),
                                 params.features.online_store, repeats, 1000)

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "overrides": overrides,
        "stage_seconds": stages,
        "total_seconds": round(sum(stages.values()), 2),
        "train": train_metrics,
        "metrics": metrics,
        "recommend": latency,
        "features": features,
        "materialize": summaries.get("materialize"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return result


def _recommend_latency(paths, params, repeats: int) -> dict[str, Any]:  # noqa: ANN001
    """Warm in-process recommendations from the live bundle (Feast online + user tower + index),
    loaded once as a long-running service would, after one warm-up call."""
    import pandas as pd

    from flows.serving.recommend import Recommender

    users = pd.read_parquet(paths.ingested / "users.parquet")["user_id"].tolist()
    with Recommender.load_live(paths.published, paths.feast, paths.features) as rec:
        rec.recommend(users[:1], 20)
        single = []
        for i in range(repeats):
            t0 = time.perf_counter()
            rec.recommend([users[i % len(users)]], 20)
            single.append(time.perf_counter() - t0)
        batch_users = users[:1000]
        t0 = time.perf_counter()
        rec.recommend(batch_users, 20)
        batch = time.perf_counter() - t0
    return {"one_user_k20": percentiles(single),
            "batch_k20": {"users": len(batch_users), "seconds": round(batch, 3),
                          "users_per_s": round(len(batch_users) / batch, 1)}}
