"""Training on a GPU beside the CPU, on a materialized project (issue 23 item 4).

    python -m flows.experiments.gpu_bench --data DATA [--throughput-data BIG] --out gpu.json

DATA and BIG are a project's data folder (samples/, training/, ingested/schema.json), the demo's
`data/` or a kept `towerflow bench --scale` project's. Both use the train stage's own functions:

1. **metrics** (DATA, `--seeds`): the train stage's validation run (flows/stages/train.py: the
   training part minus its validation split, the default epochs and early stopping) on `cuda` and on
   `cpu`, validation NDCG@20 after every epoch: a GPU run must land within the seeds' spread of the
   CPU's (every random draw is made on the CPU generator either way; bf16 autocast and the GPU's sums
   are what differ);
2. **throughput** (BIG, default DATA): the refit stream (samples/full.parquet) for `--epochs` epochs
   without validation, examples/s per epoch (the first one pays CUDA's start-up), on the GPU with
   and without bf16 autocast, at the default batch and at the `--gpu-batches` (a larger batch changes
   the in-batch softmax, so those rows are speed only), then on the CPU with train.threads;
3. **profile** (BIG, `--profile-steps`): where a step's time goes at the default batch, on the GPU
   then on the CPU (train_bench.profile: each labelled part's host time, and on the GPU its busy time
   per step: a GPU busy for a small share of the step waits on the host).

GPU configurations run first and the file is rewritten after every row, so a run cut short by a
time limit still says what it measured. Needs a CUDA build of torch and a visible GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flows.experiments.machine import machine
from flows.experiments.train_bench import build_stream, profile
from flows.params import Params, load_params
from flows.stages.train import TrainInputs, read_inputs, validation_run
from models.device import resolve_threads
from models.params import TrainParams
from models.training import DistContext, fit


def _machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**machine(), "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu,
            "platform": platform.platform()}


def metrics_inputs(params: Params, data: Path) -> TrainInputs:
    """The train stage's inputs of `data`, read once for every metrics row."""
    # the validation run reads the eval stream (samples/train.parquet) alone: the refit stream need not be there
    cfg = params.train.model_copy(update={"refit_full": False})
    return read_inputs(cfg, data / "samples", data / "training", data / "ingested/schema.json")


def metrics_row(params: Params, inputs: TrainInputs, device: str, seed: int, work: Path) -> dict[str, Any]:
    """The train stage's validation run on `device`: NDCG@20 per epoch, the best, the speed."""
    cfg = params.train.model_copy(update={"device": device, "refit_full": False})
    # a folder of its own: the stage resumes from a checkpoint it finds, and each row must train afresh
    ckpt = Path(tempfile.mkdtemp(prefix=f"metrics_{device}_{seed}_", dir=work))
    start = time.perf_counter()
    run = validation_run(params.model, cfg, seed, inputs, ckpt, DistContext())
    if run is None:
        raise SystemExit(f"{inputs.examples_path}: no user has a validation split; use a larger data set")
    val = run.result.val_ndcg
    return {"device": device, "seed": seed, "best_val_ndcg@20": round(max(val), 5), "best_epoch": run.result.best_epoch,
            "val_ndcg@20": [round(v, 5) for v in val], "examples_per_s": run.metrics["examples_per_s"],
            "resumed_from_epoch": run.result.resumed_from, "wall_s": round(time.perf_counter() - start, 1)}


def throughput_row(stream, config, cfg: TrainParams, seed: int, epochs: int) -> dict[str, Any]:  # noqa: ANN001
    """examples/s per epoch of one fit on `cfg.device` (no validation, no early stopping)."""
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_cfg = cfg.model_copy(update={"workers": 1, "epochs": epochs, "early_stopping": False})
    result = fit(stream, config, run_cfg, seed)
    rates = [round(len(stream) / s) for s in result.seconds]
    steady = rates[1:] or rates
    return {"device": cfg.device, "mixed_precision": cfg.mixed_precision and cuda, "batch_size": cfg.batch_size,
            "threads": resolve_threads(cfg.threads), "examples": len(stream), "examples_per_s_by_epoch": rates,
            "examples_per_s": round(statistics.median(steady)), "losses": [round(x, 4) for x in result.losses],
            "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}


def profile_rows(stream, config, cfg: TrainParams, seed: int, steps: int) -> list[dict[str, Any]]:  # noqa: ANN001
    """train_bench.profile on cfg.device as json rows: ms per step of each labelled part (host time),
    and on a GPU its busy time per step."""
    return [{"part": label, "ms_per_step": round(ms, 3), "share": round(share, 4)}
            for label, ms, share in profile(stream, config, cfg, seed, steps)]


def gpu_bench(params: Params, data: Path, big: Path, seeds: list[int], epochs: int, gpu_batches: list[int],
              out: Path, gpu: str = "cuda", profile_steps: int = 20) -> dict[str, Any]:
    """`gpu`: the device the GPU rows use ('cpu' only to rehearse this script on a machine without one).
    profile_steps: a profile of that many steps at the default batch on `gpu`, then on the CPU (0: none)."""
    if gpu.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA GPU visible to this torch "
                         f"({torch.__version__}, CUDA {torch.version.cuda})")
    torch.set_num_threads(resolve_threads(params.train.threads))
    doc: dict[str, Any] = {"machine": _machine(), "data": str(data), "throughput_data": str(big),
                           "throughput": [], "metrics": [], "profile": {}}

    def save(row: Any) -> None:
        """Rewrite the file with every row so far and print the one just measured."""
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(row), flush=True)

    base = params.train
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        work = Path(tmp)
        stream, config = build_stream(big, params.model, base, work / "stream")
        gpu_runs = [base.model_copy(update={"device": gpu}),
                    base.model_copy(update={"device": gpu, "mixed_precision": False}),
                    *[base.model_copy(update={"device": gpu, "batch_size": b}) for b in gpu_batches]]
        inputs = metrics_inputs(params, data)
        for cfg in gpu_runs:
            doc["throughput"].append(throughput_row(stream, config, cfg, seeds[0], epochs))
            save(doc["throughput"][-1])
        if profile_steps:
            doc["profile"][gpu] = profile_rows(stream, config, gpu_runs[0], seeds[0], profile_steps)
            save({"profile": gpu, "rows": doc["profile"][gpu]})
        for seed in seeds:
            doc["metrics"].append(metrics_row(params, inputs, gpu, seed, work))
            save(doc["metrics"][-1])
        cpu = base.model_copy(update={"device": "cpu"})
        doc["throughput"].append(throughput_row(stream, config, cpu, seeds[0], max(1, epochs - 1)))
        save(doc["throughput"][-1])
        if profile_steps:
            doc["profile"]["cpu"] = profile_rows(stream, config, cpu, seeds[0], profile_steps)
            save({"profile": "cpu", "rows": doc["profile"]["cpu"]})
        for seed in seeds:
            doc["metrics"].append(metrics_row(params, inputs, "cpu", seed, work))
            save(doc["metrics"][-1])
    by_device = {d: [r["best_val_ndcg@20"] for r in doc["metrics"] if r["device"] == d] for d in (gpu, "cpu")}
    doc["summary"] = {d: {"mean": round(statistics.mean(v), 5), "sd": round(statistics.stdev(v), 5) if len(v) > 1 else 0.0}
                      for d, v in by_device.items()}
    rate = {(r["device"], r["batch_size"], r["mixed_precision"]): r["examples_per_s"] for r in doc["throughput"]}
    gpu_default = rate[(gpu, base.batch_size, base.mixed_precision and gpu.startswith("cuda"))]
    doc["summary"]["gpu_over_cpu_at_default_batch"] = round(gpu_default / rate[("cpu", base.batch_size, False)], 2)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--throughput-data", type=Path)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--set", action="append", default=[], help="params override, e.g. train.epochs=5")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each throughput row")
    ap.add_argument("--gpu-batches", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--out", type=Path, default=Path("reports/bench_gpu.json"))
    ap.add_argument("--gpu", default="cuda", help="the GPU rows' device (cpu: rehearse without a GPU)")
    ap.add_argument("--profile-steps", type=int, default=20,
                    help="steps of a torch.profiler profile at the default batch on the GPU and on the CPU (0: none)")
    args = ap.parse_args(argv)
    params = load_params(args.params, args.set)
    doc = gpu_bench(params, args.data, args.throughput_data or args.data, args.seeds, args.epochs,
                    args.gpu_batches, args.out, args.gpu, args.profile_steps)
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
