"""Full retrain vs fine-tune as new interactions arrive (issue 15; the reading is in docs/INCREMENTAL.md).

    towerflow incremental-bench --data <dir with training/ and ingested/schema.json> --epochs 5

The materialized examples (point-in-time features: each row's history and counts are as of its own
time, so the rows before a time are what a run at that time would have materialized) are cut by time
into a base (the first `base_share` of the rows) and `increments` equal slices. The base model is a
full training on the base. After increment k both ways update the model that served until then:
  full      train from scratch on every row up to the end of increment k (epochs, as the train stage)
  finetune  the previous fine-tuned model grown to the new vocabularies, finetune_epochs on the rows
            of increment k plus a replay share of the older rows (models/finetune.py)
  stale     no update: the base model
and each is scored on increment k+1 (a temporal holdout: a user's query is their first row there, with
all history before it; items they had before are excluded; the others they took are the targets).
The last increment is only a holdout. Writes <out>/incremental.json and <out>/incremental.md.
Streams are the examples themselves (no popular-item down-sampling, no hard negatives).
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from models.encoding import FeatureEncoder
    from models.params import ModelParams, TrainParams
    from models.towers import TwoTower

K = 20


@dataclass
class _Model:
    model: TwoTower
    encoder: FeatureEncoder


@dataclass(frozen=True)
class BenchConfig:
    base_share: float = 0.7
    increments: int = 4              # the last one is only a holdout: increments - 1 updates
    epochs: int = 5                  # full trainings
    finetune_epochs: int = 2
    replay: float = 0.2
    seed: int = 0


def time_bounds(times: pd.Series, base_share: float, increments: int) -> list[pd.Timestamp]:
    """[end of base, end of increment 1, ..., past the last row]: row quantiles of time (the demo's
    ratings are far from uniform over its seven months, so equal row counts, not equal durations)."""
    import numpy as np
    import pandas as pd

    shares = np.linspace(base_share, 1.0, increments + 1)[:-1]
    return [times.quantile(q, interpolation="lower") for q in shares] + [times.max() + pd.Timedelta(microseconds=1)]


def _encoder(schema: dict, items: pd.DataFrame, rows: pd.DataFrame, model_cfg: ModelParams,
             history_length: int) -> FeatureEncoder:
    from models.encoding import FeatureEncoder

    return FeatureEncoder.fit(schema, items, rows, min_count=model_cfg.min_count, history_length=history_length,
                              behaviour_counts=model_cfg.behaviour_counts)


def _stream(encoder: FeatureEncoder, rows: pd.DataFrame, items: pd.DataFrame):  # noqa: ANN202
    from models.stream import TrainingStream, catalog_inputs

    return TrainingStream.build(encoder, rows.reset_index(drop=True), items, catalog_inputs(encoder, items))


def full_update(schema: dict, items: pd.DataFrame, rows: pd.DataFrame, model_cfg: ModelParams,
                train_cfg: TrainParams, seed: int, history_length: int) -> tuple[_Model, dict]:
    from models.training import fit, tower_config

    start = time.perf_counter()
    encoder = _encoder(schema, items, rows, model_cfg, history_length)
    result = fit(_stream(encoder, rows, items), tower_config(encoder, model_cfg), train_cfg, seed)
    return _Model(result.model, encoder), {"seconds": round(time.perf_counter() - start, 2), "rows": len(rows),
                                           "epochs": len(result.losses)}


def finetune_update(previous: _Model, schema: dict, items: pd.DataFrame, rows: pd.DataFrame, cutoff: pd.Timestamp,
                    model_cfg: ModelParams, train_cfg: TrainParams, bench: BenchConfig,
                    history_length: int) -> tuple[_Model, dict]:
    from models.finetune import extend_encoder, finetune, grow_model, update_rows
    from models.training import tower_config

    start = time.perf_counter()
    encoder = extend_encoder(previous.encoder, _encoder(schema, items, rows, model_cfg, history_length))
    model = grow_model(previous.model, tower_config(encoder, model_cfg), bench.seed)
    picked = update_rows(rows, cutoff, bench.replay, bench.seed, inclusive=True)
    cfg = train_cfg.model_copy(update={"epochs": bench.finetune_epochs})
    with tempfile.TemporaryDirectory(prefix="towerflow-finetune-") as work:
        result = finetune(model, _stream(encoder, picked.rows, items), cfg, bench.seed, Path(work))
    return _Model(result.model, encoder), {"seconds": round(time.perf_counter() - start, 2),
                                           "rows": len(picked.rows), "new_rows": picked.new,
                                           "replay_rows": picked.replay, "epochs": len(result.losses)}


def score(models: dict[str, _Model | None], fit_rows: pd.DataFrame, held: pd.DataFrame,
          items: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Recall/NDCG@K of each model (None: most popular of fit_rows) on the temporal holdout `held`."""
    import pandas as pd

    from models.evaluation import most_popular_scorer, two_tower_scorer
    from models.holdout import catalog_task
    from models.inference import TwoTowerBundle
    from models.metrics import full_catalog_metrics, rounded

    task = catalog_task(pd.concat([fit_rows.assign(split="train"), held.assign(split="test")], ignore_index=True),
                        items)
    out = {}
    for name, m in models.items():
        scorer = most_popular_scorer(task) if m is None else two_tower_scorer(TwoTowerBundle(m.model, m.encoder), task)
        out[name] = rounded(full_catalog_metrics(scorer, task.n_users, task.n_items, task.seen, task.relevant, [K]))
    out["queries"] = {"users": task.n_users, "targets": int(len(task.relevant[0]))}
    return out


def run_bench(data: Path, model_cfg: ModelParams, train_cfg: TrainParams, bench: BenchConfig,
              log: Any = print) -> dict:
    """The steps described in the module docstring; returns the figures written by `write`."""
    import pandas as pd
    import torch

    from models.device import resolve_threads
    from models.encoding import HISTORY_COLUMN

    torch.set_num_threads(resolve_threads(train_cfg.threads))
    schema = json.loads((data / "ingested" / "schema.json").read_text())
    items = pd.read_parquet(data / "training" / "items.parquet")
    examples = pd.read_parquet(data / "training" / "examples.parquet").drop(columns=["split"])
    examples = examples.sort_values("timestamp", kind="stable").reset_index(drop=True)
    history_length = int(examples[HISTORY_COLUMN].map(len).max())
    bounds = time_bounds(examples["timestamp"], bench.base_share, bench.increments)
    cfg = train_cfg.model_copy(update={"epochs": bench.epochs, "early_stopping": False, "workers": 1})
    before = lambda t: examples[examples["timestamp"] < t]                                   # noqa: E731
    window = lambda a, b: examples[(examples["timestamp"] >= a) & (examples["timestamp"] < b)]  # noqa: E731
    base, base_fig = full_update(schema, items, before(bounds[0]), model_cfg, cfg, bench.seed, history_length)
    log(f"base: {base_fig['rows']} rows, {base_fig['seconds']} s")
    steps, tuned = [], base
    for k in range(1, bench.increments):
        cut, end = bounds[k - 1], bounds[k]
        full, full_fig = full_update(schema, items, before(end), model_cfg, cfg, bench.seed, history_length)
        tuned, tune_fig = finetune_update(tuned, schema, items, before(end), cut, model_cfg, cfg, bench,
                                          history_length)
        figures = score({"full": full, "finetune": tuned, "stale": base, "most_popular": None},
                        before(end), window(end, bounds[k + 1]), items)
        steps.append({"increment": k, "train_until": str(end), "holdout_until": str(bounds[k + 1]),
                      "full": full_fig, "finetune": tune_fig, "metrics": figures})
        log(f"increment {k}: full {full_fig['seconds']} s {figures['full']}, "
            f"finetune {tune_fig['seconds']} s {figures['finetune']}, stale {figures['stale']}")
    return {"config": {**bench.__dict__, "model": model_cfg.model_dump(), "batch_size": cfg.batch_size,
                       "lr": cfg.lr, "threads": resolve_threads(cfg.threads), "k": K},
            "rows": len(examples), "base": base_fig, "steps": steps}


MODELS = ("full", "finetune", "stale", "most_popular")


def _mean_std(values: list[float]) -> dict[str, float]:
    import statistics

    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def run_seeds(data: Path, model_cfg: ModelParams, train_cfg: TrainParams, bench: BenchConfig, seeds: list[int],
              log: Any = print) -> dict:
    """run_bench once per seed; the summary holds each step's mean and std over the seeds."""
    runs = [run_bench(data, model_cfg, train_cfg, BenchConfig(**{**bench.__dict__, "seed": s}), log) for s in seeds]
    summary = []
    for k, first in enumerate(runs[0]["steps"]):
        steps = [r["steps"][k] for r in runs]
        row: dict[str, Any] = {"increment": first["increment"], "queries": first["metrics"]["queries"]}
        for way in ("full", "finetune"):
            row[f"{way}_seconds"] = _mean_std([s[way]["seconds"] for s in steps])
            row[f"{way}_rows"] = first[way]["rows"]
        for name in MODELS:
            for metric in (f"recall@{K}", f"ndcg@{K}"):
                row[f"{name}_{metric}"] = _mean_std([s["metrics"][name][metric] for s in steps])
        summary.append(row)
    return {"config": {**runs[0]["config"], "seeds": seeds}, "rows": runs[0]["rows"], "summary": summary,
            "runs": runs}


def markdown(result: dict) -> str:
    c = result["config"]
    fmt = lambda f: f"{f['mean']:.4f} ± {f['std']:.4f}"                    # noqa: E731
    lines = ["# Incremental updates: full retrain vs fine-tune (MovieLens-100K by time)", "",
             f"Base: the first {c['base_share']:.0%} of {result['rows']} rows by time, then {c['increments']} "
             f"equal increments. Full: {c['epochs']} epochs from scratch on every row so far. Fine-tune: "
             f"{c['finetune_epochs']} epochs from the previous fine-tuned model on the increment + a "
             f"{c['replay']:.0%} replay of older rows. Stale: the base model, never updated. Scored on the next "
             f"increment (temporal holdout) @{c['k']}; mean ± std over seeds {c['seeds']}; {c['threads']} torch "
             "thread(s).", "",
             "| after increment | queried users | rows full / fine-tune | full s | fine-tune s | speed-up |",
             "|---|---|---|---|---|---|"]
    for r in result["summary"]:
        speed = r["full_seconds"]["mean"] / max(r["finetune_seconds"]["mean"], 1e-9)
        lines.append(f"| {r['increment']} | {r['queries']['users']} | {r['full_rows']} / {r['finetune_rows']} | "
                     f"{r['full_seconds']['mean']:.1f} | {r['finetune_seconds']['mean']:.1f} | {speed:.1f}x |")
    for metric in (f"recall@{c['k']}", f"ndcg@{c['k']}"):
        lines += ["", f"| after increment | {metric} full | fine-tune | stale | most popular |", "|---|---|---|---|---|"]
        lines += [f"| {r['increment']} | " + " | ".join(fmt(r[f"{name}_{metric}"]) for name in MODELS) + " |"
                  for r in result["summary"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "incremental.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "incremental.md").write_text(markdown(result))
