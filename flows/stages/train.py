"""train stage: fit the evaluation model on train.parquet and the refit model on full.parquet.

Early stopping picks the epoch count: a first run trains on the training part minus a validation
split carved with the test split's temporal protocol and watches validation NDCG@20; the evaluation
model is then fitted on the whole training part for the best epoch count (so the most recent 20% of
each user's training rows, the closest to the test period, are not lost), and the refit model on all
rows for the same count. Checkpoints live in <model dir>/../model_ckpt/<key>/, keyed by a hash of the
params and the input files, so a rerun after a kill resumes and a param change starts afresh.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from flows.errors import DataContractError, MissingStageInput
from features.memory import return_freed_memory
from flows.serving.store import EVAL_MODEL_DIR, BundleStore
from models.checkpoint import load_model, save_model, save_warm_start
from models.device import resolve_device, resolve_threads
from models.distributed import join_launched_group, spawn_fit
from models.early_stopping import ValidationTask, carve, outside
from models.encoding import HISTORY_COLUMN, FeatureEncoder, longest_list, parquet_column, read_scalar_columns
from models.finetune import (IncompatibleModel, data_until, extend_encoder, grow_model, newer_than, replayed_rows,
                             write_rows)
from models.fork_pool import TORCH_FIT, run_jobs
from models.params import ModelParams, TrainParams
from models.stream import TrainingStream, catalog_inputs
from models.towers import TwoTower
from models.training import PROGRESS_FIELDS, DistContext, FitResult, fit, tower_config

CURVES = "curves"
Curve = list[tuple[int, float, float | None]]      # per epoch: (epoch, loss, val_ndcg@20 or None)


def _read(path: Path, upstream: str) -> pd.DataFrame:
    if not path.exists():
        raise MissingStageInput(f"{path}: not found; run the {upstream} stage first")
    return pd.read_parquet(path)


@dataclass(frozen=True)
class TrainInputs:
    schema: dict
    items: pd.DataFrame
    examples_path: Path
    examples: pd.DataFrame            # every column but the history lists
    history_length: int               # the longest history list
    streams: dict[str, Path]          # model name -> its sampled stream, for the models to train

    def key_files(self, schema_path: Path) -> list[Path]:
        """The files whose content decides the trained weights."""
        return [*self.streams.values(), self.examples_path, self.examples_path.parent / "items.parquet", schema_path]


def read_inputs(train_cfg: TrainParams, samples_dir: Path, training_dir: Path, schema_path: Path) -> TrainInputs:
    if not schema_path.exists():
        raise MissingStageInput(f"{schema_path}: not found; run the ingest stage first")
    schema = json.loads(schema_path.read_text())
    items = _read(training_dir / "items.parquet", "materialize")
    examples_path = training_dir / "examples.parquet"
    if not examples_path.exists():
        raise MissingStageInput(f"{examples_path}: not found; run the materialize stage first")
    # The encoder needs ids, times, user features and counts, not the history lists (the widest
    # column): those are streamed with the samples, and only their longest length is read here.
    examples = read_scalar_columns(examples_path)
    if "split" not in examples.columns:
        raise DataContractError(f"{examples_path}: required column 'split' is missing")
    history_length = longest_list(parquet_column(examples_path, HISTORY_COLUMN, train_cfg.read_batch_rows))
    all_streams = {"eval": samples_dir / "train.parquet", "full": samples_dir / "full.parquet"}
    streams = {name: all_streams[name] for name in (["eval", "full"] if train_cfg.refit_full else ["eval"])}
    for path in streams.values():
        if not path.exists():
            raise MissingStageInput(f"{path}: not found; run the sample stage first")
        if pq.ParquetFile(path).metadata.num_rows == 0:
            raise DataContractError(f"{path}: no training rows (check split and sample params)")
    return TrainInputs(schema=schema, items=items, examples_path=examples_path, examples=examples,
                   history_length=history_length, streams=streams)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_key(model_cfg: ModelParams, train_cfg: TrainParams, seed: int, inputs: list[Path]) -> str:
    """Hash of everything that determines the trained weights (threads, fit_processes and read_batch_rows
    excluded: they change speed only; compile is in: it keeps every embedding table on dense Adam,
    models/optim.py)."""
    doc = {"model": model_cfg.model_dump(),
           "train": train_cfg.model_dump(exclude={"threads", "fit_processes", "read_batch_rows"}),
           "seed": seed, "inputs": {p.name: _file_digest(p) for p in inputs}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Progress:
    """Epoch lines on stderr; a class, not a closure, so spawned data-parallel workers can pickle it."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, line: str) -> None:
        print(f"train[{self.name}] {line}", file=sys.stderr, flush=True)


@dataclass
class _Run:
    """One trained model with what the stage reports about it."""

    encoder: FeatureEncoder
    result: FitResult
    metrics: dict
    curve: Curve


def _fit_run(name: str, model_cfg: ModelParams, train_cfg: TrainParams, seed: int, encoder: FeatureEncoder,
             stream: TrainingStream, epochs: int | None, task: ValidationTask | None, ckpt: Path,
             dist: DistContext, on_epoch: Callable[[int], None] | None = None) -> _Run:
    """Fit one model (data-parallel over train_cfg.workers processes unless this process already is a
    rank of a launched group) and summarize it."""
    tower_cfg = tower_config(encoder, model_cfg)
    checkpoint, log = ckpt / f"{name}.pt", _Progress(name)
    if train_cfg.workers > 1 and dist.world == 1:
        result = spawn_fit(stream, tower_cfg, train_cfg, seed, epochs, task, checkpoint, log)
    else:
        result = fit(stream, tower_cfg, train_cfg, seed, epochs=epochs, validation=task, checkpoint=checkpoint,
                     log=log, on_epoch=on_epoch, dist=dist)
    metrics = result.summary(len(stream)) | stream.hard_negative_summary()
    val: list[float | None] = [*result.val_ndcg] or [None] * len(result.losses)
    curve = [(e + 1, round(loss, 6), None if v is None else round(v, 6))
             for e, (loss, v) in enumerate(zip(result.losses, val))]
    return _Run(encoder=encoder, result=result, metrics=metrics, curve=curve)


def _fit_encoder(model_cfg: ModelParams, inputs: TrainInputs, seen_rows: pd.DataFrame) -> FeatureEncoder:
    return FeatureEncoder.fit(inputs.schema, inputs.items, seen_rows, min_count=model_cfg.min_count,
                              history_length=inputs.history_length, behaviour_counts=model_cfg.behaviour_counts)


def validation_run(model_cfg: ModelParams, train_cfg: TrainParams, seed: int, inputs: TrainInputs, ckpt: Path,
                    dist: DistContext) -> _Run | None:
    """Train on the training part minus its validation split, watching validation NDCG@20; None when
    no user has enough training rows for a validation split."""
    # with the history lists: validation queries are encoded from their rows
    full_train = pd.read_parquet(inputs.examples_path)
    full_train = full_train[full_train["split"] == "train"].reset_index(drop=True)
    val_rows = full_train[carve(full_train, train_cfg.val_fraction).to_numpy()]
    if not len(val_rows):
        return None
    encoder = _fit_encoder(model_cfg, inputs, _train_part(inputs))
    catalog = catalog_inputs(encoder, inputs.items)
    # the validation run filters rows by key, so it holds its stream in memory
    stream_rows = pd.read_parquet(inputs.streams["eval"])
    task = ValidationTask.build(encoder, full_train[outside(full_train, val_rows)], val_rows)
    stream = TrainingStream.build(encoder, stream_rows[outside(stream_rows, val_rows)], inputs.items, catalog)
    return _fit_run("validation", model_cfg, train_cfg, seed, encoder, stream, None, task, ckpt, dist)


def _model_run(name: str, model_cfg: ModelParams, train_cfg: TrainParams, seed: int, inputs: TrainInputs,
               epochs: int, ckpt: Path, dist: DistContext, on_epoch: Callable[[int], None] | None = None) -> _Run:
    """The eval model (vocabularies from the training part) or the refit model (from every row), its
    stream read from disk in batches into memory-mapped arrays (bounded memory)."""
    encoder = _fit_encoder(model_cfg, inputs, _train_part(inputs) if name == "eval" else inputs.examples)
    return_freed_memory()   # the fit's copies (the eval part: 0.7 GB at 10M) are not held through training
    catalog = catalog_inputs(encoder, inputs.items)
    stream = TrainingStream.from_parquet(encoder, inputs.streams[name], inputs.items, catalog,
                                         spill=ckpt / f"{name}_stream", batch_rows=train_cfg.read_batch_rows)
    return _fit_run(name, model_cfg, train_cfg, seed, encoder, stream, epochs, None, ckpt, dist, on_epoch)


def _train_part(inputs: TrainInputs) -> pd.DataFrame:
    return inputs.examples[inputs.examples["split"] == "train"].reset_index(drop=True)


@dataclass(frozen=True)
class _Live:
    """The live bundle's model a fine-tune starts from."""

    model_dir: Path
    version: str
    trained_until: pd.Timestamp | None   # the newest interaction the live model trained on (model.json)
    cutoff: pd.Timestamp | None      # train.since, or trained_until
    inclusive: bool                  # since: rows at or after it; the live cutoff: rows after it
    epochs: int                      # train.finetune_epochs
    replay: float                    # train.finetune_replay
    replay_per_new: float | None = None   # train.finetune_replay_per_new


def _live_model(train_cfg: TrainParams, published_dir: Path | None) -> tuple[_Live | None, str | None]:
    """(the live model to fine-tune, None) or (None, why a finetune update trains in full)."""
    # the update fields belong to the train section of params.yaml (flows/params.py TrainSection); the
    # stage reads them by name so that it does not depend on the whole params module
    if getattr(train_cfg, "update", "full") != "finetune":
        return None, None
    # read through the store (flows/serving/store.py: files only, no index or publishing code, which
    # are not part of what decides the trained weights)
    store = BundleStore(published_dir) if published_dir is not None else None
    version = store.live() if store is not None else None
    if version is None:
        return None, "no live bundle to fine-tune: trained in full"
    model_dir = store.model_dir(version)
    trained_until = _data_until(model_dir)
    since = getattr(train_cfg, "since", None)
    if since is not None:
        cutoff, inclusive = pd.Timestamp(since), True
        cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    else:
        cutoff, inclusive = trained_until, False
    return _Live(model_dir, version, trained_until, cutoff, inclusive, getattr(train_cfg, "finetune_epochs", 2),
                 getattr(train_cfg, "finetune_replay", 0.2), getattr(train_cfg, "finetune_replay_per_new", None)), None


def _data_until(model_dir: Path) -> pd.Timestamp | None:
    """The newest interaction a saved model trained on (its model.json), None when it does not say."""
    meta = json.loads((model_dir / "model.json").read_text()) if (model_dir / "model.json").exists() else {}
    return pd.Timestamp(meta["data_until"]) if meta.get("data_until") else None




def _eval_start(live: _Live, examples: pd.DataFrame) -> tuple[_Live | None, str | None]:
    """What the eval model fine-tunes from: a model that never saw this run's holdout (the test split),
    else it would be scored on rows it learned, an optimistic figure the gate would trust. The live
    bundle's evaluation model (trained without its run's holdout, so without this one's while the data
    grows by newer rows), else the live model when its data ends before the holdout starts; (None,
    why) when neither is there."""
    twin = live.model_dir.parent / EVAL_MODEL_DIR
    if (twin / "model.pt").is_file():
        until = _data_until(twin)
        return replace(live, model_dir=twin, trained_until=until, cutoff=live.cutoff if live.inclusive else until), None
    held = examples.loc[examples["split"] == "test", "timestamp"] if "timestamp" in examples.columns else None
    if held is None or held.empty:
        return live, None
    starts = pd.to_datetime(held, utc=True).min()
    if live.trained_until is None:
        return None, f"live {live.version} keeps no evaluation model and does not record its training data's end"
    if live.trained_until >= starts:
        return None, (f"live {live.version} keeps no evaluation model and trained on data until "
                      f"{live.trained_until.isoformat()}, after this run's holdout starts ({starts.isoformat()})")
    return live, None


def _finetune_run(name: str, model_cfg: ModelParams, train_cfg: TrainParams, seed: int, inputs: TrainInputs,
                  live: _Live, ckpt: Path, dist: DistContext) -> _Run:
    """Start from the live model (vocabularies extended, trained rows kept: models/finetune.py) and train
    live.epochs on the rows newer than its cutoff plus a replay share of the older ones."""
    trained, trained_encoder = load_model(live.model_dir)
    fresh = _fit_encoder(model_cfg, inputs, _train_part(inputs) if name == "eval" else inputs.examples)
    encoder = extend_encoder(trained_encoder, fresh)
    model = grow_model(trained, tower_config(encoder, model_cfg), seed)
    rows = pq.ParquetFile(inputs.streams[name]).metadata.num_rows
    if live.cutoff is None:            # a model that did not record its data's end: every row is new
        newer, replayed = np.ones(rows, dtype=bool), np.zeros(rows, dtype=bool)
    else:
        times = _stream_column(inputs.streams[name], "timestamp").to_pandas()
        newer = newer_than(times, live.cutoff, live.inclusive)
        replayed = replayed_rows(newer, live.replay, seed, live.replay_per_new)
    update = {"mode": "finetune", "from_version": live.version, "from_model": live.model_dir.name,
              "cutoff": None if live.cutoff is None else live.cutoff.isoformat(), "new_rows": int(newer.sum()),
              "replay_rows": int(replayed.sum()), "new_users": encoder.user_ids.size - trained_encoder.user_ids.size,
              "new_items": encoder.item_ids.size - trained_encoder.item_ids.size}
    if not newer.any():     # nothing the live model has not learned: its weights stay
        return _Run(encoder, FitResult(model=model, notes=["no new interaction: weights kept"]),
                    {"update": {**update, "kept": "no interaction newer than the cutoff: the weights are kept"}}, [])
    ckpt.mkdir(parents=True, exist_ok=True)
    rows_path = ckpt / f"{name}_update.parquet"
    write_rows(inputs.streams[name], newer | replayed, rows_path, train_cfg.read_batch_rows)
    return _update_run(name, model_cfg, train_cfg, seed, inputs, model, encoder, rows_path, update, live.epochs,
                       ckpt, dist)


def _continue_run(model_cfg: ModelParams, train_cfg: TrainParams, seed: int, inputs: TrainInputs,
                  runs: dict[str, _Run], epochs: int, ckpt: Path, dist: DistContext) -> _Run:
    """The refit model as this run's eval model (taken out of `runs`) ended: its weights, vocabularies
    extended by what only the held-out rows bring (models/finetune.py), then train.refit_epochs (at most
    the eval model's `epochs`) over every row of the full stream (train.refit_from: eval;
    docs/TRAINING.md "Refit from the eval model")."""
    eval_run = runs.pop("eval")
    trained_encoder = eval_run.encoder
    encoder = extend_encoder(trained_encoder, _fit_encoder(model_cfg, inputs, inputs.examples))
    model = grow_model(eval_run.result.model, tower_config(encoder, model_cfg), seed)
    del eval_run        # its weights are copied (and saved): not held through the refit (1M users: 0.3 GB)
    update = {"mode": "continue", "from_model": "eval", "rows": pq.ParquetFile(inputs.streams["full"]).metadata.num_rows,
              "new_users": encoder.user_ids.size - trained_encoder.user_ids.size,
              "new_items": encoder.item_ids.size - trained_encoder.item_ids.size}
    return _update_run("full", model_cfg, train_cfg, seed, inputs, model, encoder, inputs.streams["full"], update,
                       min(getattr(train_cfg, "refit_epochs", 2), epochs), ckpt, dist)


def _stream_column(path: Path, column: str):  # noqa: ANN202 (a pyarrow ChunkedArray)
    """One column of a sampled stream, read alone (not the history lists of every row)."""
    if column not in pq.read_schema(path).names:
        raise DataContractError(f"{path}: required column '{column}' is missing; run the sample stage again")
    return pq.read_table(path, columns=[column]).column(0)


def _update_run(name: str, model_cfg: ModelParams, train_cfg: TrainParams, seed: int, inputs: TrainInputs,
                model: TwoTower, encoder: FeatureEncoder, rows_path: Path, update: dict, epochs: int, ckpt: Path,
                dist: DistContext) -> _Run:
    """Train a started `model` (grown to `encoder`) for `epochs` on the stream at `rows_path`; `update`
    (what it starts from and trains on) goes into its metrics."""
    base = {k: getattr(train_cfg, k) for k in TrainParams.model_fields}     # the TrainParams part
    cfg = TrainParams(**base | {"epochs": epochs, "early_stopping": False})
    ckpt.mkdir(parents=True, exist_ok=True)
    if not (ckpt / f"{name}.pt").exists():      # else: a killed run resumes from its own checkpoint
        save_warm_start(ckpt / f"{name}.pt", model, cfg, seed, PROGRESS_FIELDS)
    stream = TrainingStream.from_parquet(encoder, rows_path, inputs.items, catalog_inputs(encoder, inputs.items),
                                         spill=ckpt / f"{name}_stream", batch_rows=cfg.read_batch_rows)
    run = _fit_run(name, model_cfg, cfg, seed, encoder, stream, cfg.epochs, None, ckpt, dist)
    run.metrics["update"] = update
    return run


# fit_processes: auto trains the two models side by side up to this many rows in the largest stream:
# each process holds its own vocabularies, stream and optimizer, so the stage's peak grows with both
# (the 4M shape: one process 3.2 GB, two 5.0 GB; the 10M one peaked at 7.4 GB in one)
AUTO_MAX_ROWS = 5_000_000
# refit_from: auto continues the eval model from this many rows in the full stream (docs/TRAINING.md)
REFIT_FROM_EVAL_ROWS = 200_000


def refit_from(train_cfg: TrainParams, rows: int) -> str:
    """Where the refit model starts (train.refit_from): scratch, or eval (as this run's eval model
    ended, then refit_epochs over every row). auto: eval from REFIT_FROM_EVAL_ROWS rows in the full
    stream."""
    chosen = getattr(train_cfg, "refit_from", "scratch")
    if chosen == "auto":
        return "eval" if rows >= REFIT_FROM_EVAL_ROWS else "scratch"
    return chosen


def fit_processes(train_cfg: TrainParams, dist: DistContext, finetune: bool, models: int, rows: int,
                  trained_here: bool = False) -> int:
    """Processes the models train in at once (train.fit_processes): auto = 2 when the eval and refit
    models both train from scratch on a CPU with threads >= 2 to split, on at most AUTO_MAX_ROWS rows;
    a count as given (at most one per model). One wherever a fit is not a plain one-process CPU fit: a
    fine-tune (its runs depend on each other's fallbacks) or a refit that continues the eval model (it
    needs that model first), data-parallel training (train.workers, torchrun: each fit is already a
    group of processes) or a GPU (a forked process cannot use its parent's CUDA). And one after this
    process trained (`trained_here`: early stopping's validation run): a process forked after torch's
    OpenMP threads ran hangs at its first parallel region on more than one thread (libgomp is not
    fork-safe), and the refit model takes every thread for its last epochs: the stage hung forever."""
    if finetune or trained_here or models < 2 or train_cfg.workers > 1 or dist.world > 1:
        return 1
    if resolve_device(train_cfg.device).type != "cpu":
        return 1
    if train_cfg.fit_processes == "auto":
        return models if resolve_threads(train_cfg.threads) >= models and rows <= AUTO_MAX_ROWS else 1
    return min(train_cfg.fit_processes, models)


def threads_after(epoch: int, epochs: int, rows: int, other_rows: int, total: int, processes: int) -> int:
    """The threads of a side-by-side fit for the epoch after `epoch`: its share of `total`, and all of
    them from the epoch in which the other fit (other_rows a pass, at about the same speed) is due to
    end, the one after floor(epochs * other_rows / rows) (that epoch overlaps the other's last moments).
    The schedule follows from the row counts alone, never from when the other process happened to
    finish: a thread count changes the order of the float sums, so a schedule read from the clock gave
    the refit model other last digits from one run to the next (and, through its vectors, the rank
    stage another served model on the same data)."""
    share = max(1, total // processes)
    if rows <= other_rows:
        return share
    return total if epoch >= math.floor(epochs * other_rows / rows) else share


def _model_job(name: str, model_cfg: ModelParams, train_cfg: TrainParams, seed: int, epochs: int, ckpt: Path,
               out_dir: Path, rows: dict[str, int], processes: int, inputs: TrainInputs) -> tuple[dict, Curve]:
    """One model trained and saved in a forked process (fit_processes): its metrics and curve. The
    longer refit run takes every thread for its last epochs (`threads_after`)."""
    total = resolve_threads(train_cfg.threads)
    other = max((n for other_name, n in rows.items() if other_name != name), default=0)
    run = _model_run(name, model_cfg, train_cfg, seed, inputs, epochs, ckpt, DistContext(),
                     on_epoch=lambda epoch: torch.set_num_threads(
                         threads_after(epoch, epochs, rows[name], other, total, processes)))
    _save_run(name, run, inputs, out_dir, seed, model_cfg, train_cfg)
    return run.metrics, run.curve


def _save_run(name: str, run: _Run, inputs: TrainInputs, out_dir: Path, seed: int, model_cfg: ModelParams,
              train_cfg: TrainParams) -> None:
    """out_dir/<name>/: the model, its encoder and model.json (what it trained on and its metrics)."""
    # the times alone: a copy of the training part's every column was 0.7 GB at 10M
    times = inputs.examples.columns.intersection(["timestamp"])
    seen = inputs.examples.loc[inputs.examples["split"] == "train", times] if name == "eval" else inputs.examples
    save_model(out_dir / name, run.result.model, run.encoder,
               extra={"trained_on": inputs.streams[name].name, "seed": seed, "train": train_cfg.model_dump(mode="json"),
                      "model": model_cfg.model_dump(), "data_until": data_until(seen), **run.metrics})


def _write_curves(folder: Path, curves: dict[str, Curve]) -> None:
    """One CSV per trained model (DVC plots draw one line per file): epoch, loss[, val_ndcg@20]."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, curve in curves.items():
        validated = any(v is not None for _, _, v in curve)
        with (folder / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", "loss", *(["val_ndcg@20"] if validated else [])])
            writer.writerows((e, loss, *([v] if validated else [])) for e, loss, v in curve)


def train(model_cfg: ModelParams, train_cfg: TrainParams, seed: int, samples_dir: Path, training_dir: Path,
          schema_path: Path, out_dir: Path, checkpoint_dir: Path | None = None,
          published_dir: Path | None = None) -> dict:
    """Writes out_dir/eval/ and out_dir/full/ (model.pt, encoder.json, model.json), out_dir/train_metrics.json
    and out_dir/curves/<model>.csv (epoch, loss[, val_ndcg@20]). full/ is a refit on all rows when
    train_cfg.refit_full, else a copy of eval/. train_cfg.workers > 1 trains data-parallel
    (models/distributed.py). Vocabularies: the whole catalog (items.parquet) + users and user feature
    values of the examples the model may see (split == 'train' for eval, all rows for full).
    checkpoint_dir (default out_dir.parent / 'model_ckpt') holds per-epoch checkpoints until success.
    train_cfg.update == 'finetune' (a TrainSection): each model starts from the live bundle of
    published_dir instead (docs/INCREMENTAL.md); train_metrics.json's 'update' says what happened."""
    torch.set_num_threads(resolve_threads(train_cfg.threads))
    # under torchrun every process runs this stage: each trains its shard, rank 0 alone writes
    dist = join_launched_group(train_cfg)
    inputs = read_inputs(train_cfg, samples_dir, training_dir, schema_path)
    live, note = _live_model(train_cfg, published_dir)
    starts = [live.model_dir / "model.pt", live.model_dir.parent / EVAL_MODEL_DIR / "model.pt"] if live else []
    key_files = inputs.key_files(schema_path) + [f for f in starts if f.is_file()]
    key = checkpoint_key(model_cfg, train_cfg, seed, key_files)
    ckpt = (checkpoint_dir or out_dir.parent / "model_ckpt") / key
    metrics: dict[str, dict] = {}
    curves: dict[str, Curve] = {}
    epochs = train_cfg.epochs
    if train_cfg.early_stopping and live is None:
        validation = validation_run(model_cfg, train_cfg, seed, inputs, ckpt, dist)
        if validation is None:
            metrics["validation"] = {"skipped": "no user has enough training rows for a validation split"}
        else:
            metrics["validation"], curves["validation"] = validation.metrics, validation.curve
            epochs = validation.result.best_epoch or train_cfg.epochs
    rows = {name: pq.ParquetFile(path).metadata.num_rows for name, path in inputs.streams.items()}
    # the refit model continues the eval model (train.refit_from) unless it fine-tunes a live one
    continued = live is None and "full" in inputs.streams and refit_from(train_cfg, rows["full"]) == "eval"
    processes = fit_processes(train_cfg, dist, finetune=live is not None or continued, models=len(inputs.streams),
                              rows=max(rows.values()), trained_here="validation" in curves)
    if processes > 1:
        # fresh trainings of eval and full share nothing but their inputs: side by side in forked
        # processes, they use two cores better than one process's two threads (docs/TRAINING.md)
        threads = resolve_threads(train_cfg.threads)
        jobs = [(name, partial(_model_job, name, model_cfg, train_cfg, seed, epochs, ckpt, out_dir, rows, processes))
                for name in inputs.streams]
        done = run_jobs(jobs, inputs, processes, max(1, threads // processes), preload=TORCH_FIT)
        for name, (run_metrics, curve) in zip(inputs.streams, done):
            metrics[name], curves[name] = run_metrics, curve
    else:
        runs: dict[str, _Run] = {}
        for name in inputs.streams:
            run = None
            # the evaluated model starts from one that never saw this run's holdout; the published one may
            start, why_full = (_eval_start(live, inputs.examples) if live is not None and name == "eval"
                               else (live, None))
            if start is not None:
                try:
                    run = _finetune_run(name, model_cfg, train_cfg, seed, inputs, start, ckpt, dist)
                except IncompatibleModel as exc:    # every model then trains in full, with the reason
                    live, note = None, f"the live model cannot be fine-tuned ({exc}): trained in full"
            if run is None and continued and name == "full":
                run = _continue_run(model_cfg, train_cfg, seed, inputs, runs, epochs, ckpt, dist)
            if run is None:
                run = _model_run(name, model_cfg, train_cfg, seed, inputs, epochs, ckpt, dist)
                if why_full is not None:
                    run.metrics["update"] = {"mode": "full", "reason": f"{why_full}: the evaluated model trains in "
                                             "full so that it never saw the holdout"}
            metrics[name], curves[name], runs[name] = run.metrics, run.curve, run
            if dist.lead:
                _save_run(name, run, inputs, out_dir, seed, model_cfg, train_cfg)
    metrics["fit_processes"] = processes
    if note is not None:
        metrics["update"] = {"mode": "full", "note": note}
    if not dist.lead:
        return metrics
    if not train_cfg.refit_full:
        shutil.rmtree(out_dir / "full", ignore_errors=True)
        shutil.copytree(out_dir / "eval", out_dir / "full")
        metrics["full"] = {"copy_of": "eval"}
    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_curves(out_dir / CURVES, curves)
    shutil.rmtree(ckpt, ignore_errors=True)    # done: a rerun with the same key starts afresh
    return metrics
