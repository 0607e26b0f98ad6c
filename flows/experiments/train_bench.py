"""Training throughput and a profile of one training step, on a materialized training set.

    .venv/bin/python -m flows.experiments.train_bench --data /tmp/demo --epochs 2 --workers 1 2

reads <data>/samples/full.parquet, <data>/training/{examples,items}.parquet and
<data>/ingested/schema.json (the train stage's refit run: the largest stream), with the model and
train sections of params.yaml (overridable with --set train.batch_size=2048), and prints
examples/s and s/epoch per worker count, then the share of a step's time in each part of the loss
(the record_function labels of models/training.py) from torch.profiler over --profile-steps steps.
--compare N: ours against the minimal two-tower of the same sizes, alternated N times (`compare`,
also part of `towerflow bench`). Nothing is written.

    .venv/bin/python -m flows.experiments.train_bench --catalog-sweep 14000 200000 1000000

needs no data: ms per step of a two-tower with that many item rows, dense Adam against sparse
gradients + SparseAdam (`catalog_sweep`; the table behind `train.sparse_min_rows: auto`, docs/TRAINING.md).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path


def build_stream(data: Path, model_params, cfg, spill: Path):
    """The stream of <data>/samples/full.parquet (a project's data folder)."""
    return stream_at(data / "samples/full.parquet", data / "training", data / "ingested/schema.json",
                     model_params, cfg, spill)


def stream_at(samples: Path, training: Path, schema_path: Path, model_params, cfg, spill: Path):
    """The train stage's refit stream of `samples` with its vocabularies, and the tower config; its
    memory maps go in `spill` (the caller's temporary folder, removed by the caller)."""
    import pandas as pd

    from models.encoding import FeatureEncoder
    from models.stream import TrainingStream
    from models.training import tower_config

    schema = json.loads(schema_path.read_text())
    items = pd.read_parquet(training / "items.parquet")
    examples = pd.read_parquet(training / "examples.parquet")
    encoder = FeatureEncoder.fit(schema, items, examples, min_count=model_params.min_count,
                                 behaviour_counts=model_params.behaviour_counts)
    # as the train stage reads it: streamed into memory maps
    stream = TrainingStream.from_parquet(encoder, samples, items, spill=spill,
                                         batch_rows=cfg.read_batch_rows)
    return stream, tower_config(encoder, model_params)


def throughput(stream, config, cfg, seed: int, epochs: int, workers: int) -> dict:
    import torch

    from models.distributed import spawn_fit
    from models.training import fit

    from models.device import resolve_threads

    run_cfg = cfg.model_copy(update={"workers": workers, "epochs": epochs, "early_stopping": False})
    torch.set_num_threads(resolve_threads(cfg.threads))
    start = time.perf_counter()
    result = spawn_fit(stream, config, run_cfg, seed) if workers > 1 else fit(stream, config, run_cfg, seed)
    wall = time.perf_counter() - start
    per_epoch = sum(result.seconds) / len(result.seconds)
    return {"workers": workers, "threads_per_worker": max(1, resolve_threads(cfg.threads) // workers),
            "s_per_epoch": round(per_epoch, 3), "examples_per_s": round(len(stream) / per_epoch),
            "wall_s_incl_startup": round(wall, 1), "losses": [round(x, 4) for x in result.losses]}


def compare(stream, config, cfg, seed: int, epochs: int = 1, rounds: int = 3) -> dict:
    """Our training (models.training.fit, one process) against the minimal two-tower of the same sizes
    (flows/experiments/minimal_two_tower.py) on the same stream and threads: `rounds` alternations of
    `epochs` epochs each, so both see the same machine load. The ratio (ours / minimal examples/s, the
    median of the rounds' ratios) is the figure to read on a shared machine; the load averages say how
    shared it was."""
    import os
    import statistics

    import torch

    from flows.experiments.minimal_two_tower import minimal_fit
    from models.device import resolve_threads
    from models.training import fit

    threads = resolve_threads(cfg.threads)
    torch.set_num_threads(threads)
    run_cfg = cfg.model_copy(update={"workers": 1, "epochs": epochs, "early_stopping": False})
    ours, minimal, loads = [], [], [os.getloadavg()[0]]
    for _ in range(rounds):
        ours.append(len(stream) * epochs / sum(fit(stream, config, run_cfg, seed).seconds))
        seconds, _ = minimal_fit(stream, config, cfg.batch_size, cfg.lr, seed, epochs)
        minimal.append(len(stream) * epochs / sum(seconds))
        loads.append(os.getloadavg()[0])
    return {"examples": len(stream), "batch_size": cfg.batch_size, "threads": threads, "device": cfg.device,
            "epochs_per_round": epochs, "rounds": rounds,
            "ours_examples_per_s": [round(x) for x in ours], "minimal_examples_per_s": [round(x) for x in minimal],
            "ratio_ours_to_minimal": round(statistics.median(o / m for o, m in zip(ours, minimal)), 3),
            "load_average_1min": [round(x, 2) for x in loads], "cpus": os.cpu_count()}


def profile(stream, config, cfg, seed: int, steps: int) -> list[tuple[str, float, float]]:
    """(label, ms per step, share of the step) for each labelled part, from torch.profiler, on
    cfg.device (`auto`: a GPU when torch sees one). The labelled times are the host's: on a GPU each
    step ends with a synchronize, so "step" is its wall time, and the row "GPU busy" is the device's
    own time per step (kernels and copies), which says whether the GPU or the host sets the pace."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    from models.towers import TwoTower
    from models.device import resolve_device, resolve_threads
    from models.heap import retained_heap
    from models.objective import BatchLoss, make_augmenter
    from models.optim import make_optimizer

    torch.set_num_threads(resolve_threads(cfg.threads))
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    model = TwoTower(config).to(device)
    # the training loop's optimizer (fused Adam, SparseAdam for large tables): torch's default Adam is
    # a per-tensor loop that took 2.8 ms of a demo step's profile against the fused kernel's 0.9 ms
    opt, _ = make_optimizer(model, cfg, lambda step: 1.0)
    gen = torch.Generator().manual_seed(seed)
    batch_loss = BatchLoss(stream, cfg, make_augmenter(stream, cfg, []), device=device,
                           mixed_precision=cfg.mixed_precision and cuda)
    perm = torch.randperm(len(stream), generator=gen)

    def step(i: int) -> None:
        with record_function("step"):
            b = perm[(i * cfg.batch_size) % len(perm):][:cfg.batch_size]
            loss = batch_loss(model, b, gen)
            opt.zero_grad(set_to_none=True)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                opt.step()
            if cuda:
                torch.cuda.synchronize(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # the heap as the training loop keeps it (models/heap.py): without, each step's large blocks are
    # fresh pages again and their first touches are counted in whichever operation makes them
    with retained_heap():
        for i in range(3):                # warm-up: allocator, first-call dispatch, CUDA's start
            step(i)
        with torch_profile(activities=activities) as prof:
            for i in range(steps):
                step(i)
    events = prof.key_averages()
    # on a GPU each label also has a device-side twin (a user annotation spanning its kernels): the host's
    # is the CPU one
    rows = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.device_type == DeviceType.CPU}
    total = rows["step"]
    labels = ["towers", "in-batch logits + hit mask", "easy negatives", "hard negatives", "retrieval loss",
              "ssl", "backward", "optimizer"]
    out = [(k, rows[k], rows[k] / total) for k in labels if k in rows]
    covered = sum(v for _, v, _ in out)
    out += [("other (batch gather, zero_grad)", total - covered, (total - covered) / total), ("step", total, 1.0)]
    if cuda:
        # kernels, copies and memsets, as torch's own "Self CUDA time total" counts them: annotations'
        # spans would count the GPU's waiting as busy
        busy = sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e3 / steps
        out.append(("GPU busy", busy, busy / total))
    return out


def catalog_sweep(rows: list[int], steps: int = 25, warmup: int = 5, batch: int = 1024,
                  history: int = 50) -> list[dict]:
    """ms per training step (forward, in-batch loss, backward, optimizer) of a two-tower whose item-id
    table has `rows` rows, with every table on dense Adam and with the item table on sparse gradients
    (models/optim.py): batches of `batch` examples with `history`-item histories, random ids."""
    import torch

    from models.losses import in_batch_listwise
    from models.optim import TowerOptimizer
    from models.towers import TwoTower, TwoTowerConfig

    def step_ms(n: int, sparse: bool) -> float:
        torch.manual_seed(0)
        model = TwoTower(TwoTowerConfig(n_items=n, n_users=1, user_categorical=[10], user_numeric=2, user_multi={},
                                        item_categorical=[20], item_numeric=3, item_multi={"genre": 50}))
        opt = TowerOptimizer(model, 1e-3, 0.0, n if sparse else None)
        gen, total = torch.Generator().manual_seed(0), 0.0
        for i in range(warmup + steps):
            users = {"user": torch.zeros(batch, dtype=torch.long), "history": torch.randint(0, n, (batch, history), generator=gen),
                     "cat": torch.randint(0, 10, (batch, 1), generator=gen), "num": torch.randn(batch, 2, generator=gen)}
            items = {"item": torch.randint(1, n, (batch,), generator=gen), "cat": torch.randint(0, 20, (batch, 1), generator=gen),
                     "num": torch.randn(batch, 3, generator=gen), "multi:genre": torch.randint(0, 50, (batch, 4), generator=gen)}
            start = time.perf_counter()
            loss = in_batch_listwise(model.encode_users(users), model.encode_items(items), 0.07)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += (time.perf_counter() - start) if i >= warmup else 0.0
        return 1000 * total / steps

    return [{"item_rows": n, "dense_adam_ms": round(step_ms(n, False), 1), "sparse_ms": round(step_ms(n, True), 1)}
            for n in rows]


def main(argv: list[str] | None = None) -> None:
    from flows.params import load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--set", action="append", default=[], help="params override, e.g. train.batch_size=2048")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--compare", type=int, default=0, metavar="ROUNDS",
                    help="also time ours against the minimal two-tower, alternating ROUNDS times")
    ap.add_argument("--catalog-sweep", type=int, nargs="+", metavar="ROWS",
                    help="instead: ms per step, dense Adam vs sparse gradients, at these item-table sizes")
    args = ap.parse_args(argv)
    if args.catalog_sweep:
        import torch

        from models.device import resolve_threads
        params = load_params(args.params, args.set)
        torch.set_num_threads(resolve_threads(params.train.threads))
        for row in catalog_sweep(args.catalog_sweep):
            print(json.dumps(row), flush=True)
        return
    if args.data is None:
        ap.error("--data is required (or --catalog-sweep)")
    params = load_params(args.params, args.set)
    with tempfile.TemporaryDirectory(prefix="towerflow-bench-stream-") as spill:
        stream, config = build_stream(args.data, params.model, params.train, Path(spill))
        _report(args, params, stream, config)


def _report(args, params, stream, config) -> None:  # noqa: ANN001
    from flows.experiments.machine import machine

    cfg = params.train
    print(json.dumps({"machine": machine()}), flush=True)     # the host, and its speed now
    print(f"stream: {len(stream)} examples, {stream.n_items} items, batch {cfg.batch_size}, "
          f"{math.ceil(len(stream) / cfg.batch_size)} steps/epoch, threads {cfg.threads}")
    for w in args.workers:
        print(json.dumps(throughput(stream, config, cfg, params.base.seed, args.epochs, w)), flush=True)
    if args.compare:
        print(json.dumps(compare(stream, config, cfg, params.base.seed, args.epochs, args.compare)), flush=True)
    if args.profile_steps:
        print(f"profile, 1 process, mean of {args.profile_steps} steps:")
        for label, ms, share in profile(stream, config, cfg, params.base.seed, args.profile_steps):
            print(f"  {label:<34} {ms:8.1f} ms  {100 * share:5.1f}%")


if __name__ == "__main__":
    from flows.environment import set_openmp_wait

    # before torch starts its OpenMP team: run as a module, the bench times what the CLI's stages run
    set_openmp_wait()
    main()
