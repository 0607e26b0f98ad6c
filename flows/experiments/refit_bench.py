"""The refit model from scratch or continued from the eval model (train.refit_from), scored on a holdout.

    .venv/bin/python -m flows.experiments.refit_bench --data <project data dir> --seeds 0 1 [--set k=v ...]

The train stage publishes a refit model trained on every row, held-out ones included, so nothing can
score it directly. This bench moves the protocol one step back: within the training part, each
user's last split.test_fraction of rows (the split's own rule, models/split.py) play the held-out
rows, and the real held-out rows score what was trained on the training part:
  base      the eval model of that smaller run (trained on the training part minus its last rows)
  scratch   refit_from: scratch: `epochs` from scratch on the whole training part
  continue  refit_from: eval: the base model, then refit_epochs more on the whole training part
Each is the train stage's own code (flows/stages/train.py) on the stage's sampled streams, scored by
the evaluate stage's code on the project's held-out rows (Recall/NDCG@20, full catalog). Prints one
JSON line per seed and the summary; writes --out (reports/refit_bench.json by default).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

K = 20
ARMS = ("base", "scratch", "continue")


def pseudo_project(data: Path, split_cfg: Any, work: Path) -> dict[str, int]:  # noqa: ANN401 (SplitParams)
    """work/{training,samples}: the training part, its last rows per user labelled 'test', and the
    sampled training stream cut the same way (train.parquet without those rows, full.parquet all of
    them, labelled)."""
    import pandas as pd

    from models.early_stopping import outside
    from models.split import temporal_split

    examples = pd.read_parquet(data / "training/examples.parquet")
    train_part = examples[examples["split"] == "train"].reset_index(drop=True)
    del examples
    train_part["split"] = temporal_split(train_part, split_cfg).to_numpy()
    held = train_part[train_part["split"] == "test"]
    (work / "training").mkdir(parents=True)
    (work / "samples").mkdir()
    train_part.to_parquet(work / "training/examples.parquet", index=False)
    shutil.copy(data / "training/items.parquet", work / "training/items.parquet")
    stream = pd.read_parquet(data / "samples/train.parquet")
    kept = outside(stream, held)
    stream["split"] = pd.Series(kept).map({True: "train", False: "test"}).to_numpy()
    stream.to_parquet(work / "samples/full.parquet", index=False)
    stream[kept].to_parquet(work / "samples/train.parquet", index=False)
    return {"training_rows": len(train_part), "late_rows": len(held), "stream_rows": len(stream),
            "stream_late_rows": int((~kept).sum())}


def _score(params: Any, data: Path, model_dir: Path, out: Path) -> dict[str, float]:  # noqa: ANN401
    from flows.stages.evaluate import evaluate

    two_tower = evaluate(params.evaluate, data / "training", model_dir, out)["two_tower"]
    return {f"recall@{K}": round(two_tower[f"recall@{K}"], 4), f"ndcg@{K}": round(two_tower[f"ndcg@{K}"], 4)}


def _arm(params: Any, data: Path, work: Path, seed: int, mode: str) -> dict[str, Any]:  # noqa: ANN401
    """One train stage run (refit_from `mode`) and the scores of its models on the project's held-out rows."""
    from flows.stages.train import train

    out = work / f"{mode}_{seed}"
    start = time.perf_counter()
    metrics = train(params.model, params.train.model_copy(update={"refit_from": mode}), seed, work / "samples",
                    work / "training", data / "ingested/schema.json", out, checkpoint_dir=work / "ckpt")
    row = {"seconds": round(time.perf_counter() - start, 1), "fit_processes": metrics["fit_processes"],
           "full": _score(params, data, out / "full", work / f"metrics_{mode}_{seed}.json")}
    if mode == "eval":
        row |= {"update": metrics["full"].get("update"),
                "eval": _score(params, data, out / "eval", work / f"metrics_base_{seed}.json")}
    return row


def _in_child(job: Any) -> Any:  # noqa: ANN401
    """job() in a forked process: the train stage forks its side-by-side fits, and a fork after this
    process ran torch's OpenMP threads can hang in the child (libgomp is not fork-safe), so this
    process never trains or scores itself."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        return pool.submit(job).result()


def one_seed(params: Any, data: Path, work: Path, seed: int, scratch: bool = True) -> dict[str, Any]:  # noqa: ANN401
    """The arms for one seed (scratch: False leaves the scratch refit out). Both runs are the whole train
    stage (eval and refit models; from scratch they train side by side in two processes, as
    train.fit_processes: auto does on a CPU), so their seconds compare what the stage costs."""
    from functools import partial

    cont = _in_child(partial(_arm, params, data, work, seed, "eval"))
    row = {"seed": seed, "base": cont["eval"], "continue": cont["full"], "continue_seconds": cont["seconds"],
           "continue_update": cont["update"]}
    if scratch:
        done = _in_child(partial(_arm, params, data, work, seed, "scratch"))
        row |= {"scratch": done["full"], "scratch_seconds": done["seconds"], "scratch_fit_processes": done["fit_processes"]}
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        if arm not in rows[0]:
            continue
        for metric in (f"recall@{K}", f"ndcg@{K}"):
            values = [r[arm][metric] for r in rows]
            out[f"{arm} {metric}"] = {"mean": round(statistics.fmean(values), 4),
                                      "std": round(statistics.stdev(values), 4) if len(values) > 1 else None}
    return out


def main(argv: list[str] | None = None) -> None:
    from flows.experiments.machine import machine
    from flows.params import load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a project's data folder (after the sample stage)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--set", action="append", default=[], help="params override, e.g. train.refit_epochs=1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("reports/refit_bench.json"))
    ap.add_argument("--no-scratch", action="store_true", help="leave the scratch refit out (another continuation)")
    args = ap.parse_args(argv)
    params = load_params(args.params, args.set)
    rows = []
    with tempfile.TemporaryDirectory(prefix="towerflow-refit-") as tmp:
        work = Path(tmp)
        sizes = pseudo_project(args.data, params.split, work)
        print(json.dumps(sizes), flush=True)
        for seed in args.seeds:
            rows.append(one_seed(params, args.data, work, seed, scratch=not args.no_scratch))
            print(json.dumps(rows[-1]), flush=True)
    report = {"machine": machine(), "data": str(args.data), "overrides": args.set, "sizes": sizes,
              "epochs": params.train.epochs, "refit_epochs": params.train.refit_epochs, "seeds": rows,
              "summary": summary(rows)}
    print(json.dumps(report["summary"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    from flows.environment import set_openmp_wait

    set_openmp_wait()      # before torch starts its OpenMP team, as the CLI's stages do
    main()
