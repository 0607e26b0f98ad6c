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
import shutil
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from flows.errors import DataContractError, MissingStageInput
from models.params import ModelParams, TrainParams


def _read(path: Path, upstream: str) -> pd.DataFrame:
    if not path.exists():
        raise MissingStageInput(f"{path}: not found; run the {upstream} stage first")
    return pd.read_parquet(path)


CURVES = "curves"


def _write_curves(folder: Path, rows: dict[str, list[tuple[int, float, float | None]]]) -> None:
    """One CSV per trained model (DVC plots draw one line per file): epoch, loss[, val_ndcg@20]."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, curve in rows.items():
        validated = any(v is not None for _, _, v in curve)
        with (folder / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", "loss", *(["val_ndcg@20"] if validated else [])])
            writer.writerows((e, loss, *([v] if validated else [])) for e, loss, v in curve)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_key(model: ModelParams, cfg: TrainParams, seed: int, inputs: list[Path]) -> str:
    """Hash of everything that determines the trained weights (threads excluded: it changes speed only)."""
    doc = {"model": model.model_dump(), "train": cfg.model_dump(exclude={"threads", "read_batch_rows"}), "seed": seed,
           "inputs": {p.name: _file_digest(p) for p in inputs}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Progress:
    """Epoch lines on stderr; a class, not a closure, so spawned data-parallel workers can pickle it."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, line: str) -> None:
        print(f"train[{self.name}] {line}", file=sys.stderr, flush=True)


def train(samples_dir: Path, training_dir: Path, schema_path: Path, model: ModelParams, cfg: TrainParams,
          seed: int, out_dir: Path, checkpoint_dir: Path | None = None) -> dict:
    """Writes out_dir/eval/ and out_dir/full/ (model.pt, encoder.json, model.json), out_dir/train_metrics.json
    and out_dir/curves/<model>.csv (epoch, loss[, val_ndcg@20]). full/ is a refit on all rows when
    cfg.refit_full, else a copy of eval/. cfg.workers > 1 trains data-parallel (models/distributed.py). Vocabularies: the whole catalog (items.parquet) + users and user
    feature values of the examples the model may see (split == 'train' for eval, all rows for full).
    checkpoint_dir (default out_dir.parent / 'model_ckpt') holds per-epoch checkpoints until success."""
    import torch

    from models.encoding import HISTORY_COLUMN, FeatureEncoder, longest_list, parquet_column
    from models.training import TrainingStream, catalog_inputs, fit, model_config, save_model
    from models.early_stopping import ValidationTask, carve, outside
    from models.distributed import join_launched_group

    torch.set_num_threads(cfg.threads)
    # under torchrun every process runs this stage: each trains its shard, rank 0 alone writes
    rank = join_launched_group(cfg)
    if not schema_path.exists():
        raise MissingStageInput(f"{schema_path}: not found; run the ingest stage first")
    schema = json.loads(schema_path.read_text())
    items = _read(training_dir / "items.parquet", "materialize")
    examples_path = training_dir / "examples.parquet"
    if not examples_path.exists():
        raise MissingStageInput(f"{examples_path}: not found; run the materialize stage first")
    # The encoder needs ids, times, user features and counts, not the history lists (the widest
    # column): those are streamed with the samples, and only their longest length is read here.
    scalar = [c for c in pq.read_schema(examples_path).names if c != HISTORY_COLUMN]
    examples = pd.read_parquet(examples_path, columns=scalar)
    if "split" not in examples.columns:
        raise DataContractError(f"{examples_path}: required column 'split' is missing")
    history_length = longest_list(parquet_column(examples_path, HISTORY_COLUMN, cfg.read_batch_rows))
    train_part = examples[examples["split"] == "train"].reset_index(drop=True)
    streams = {"eval": samples_dir / "train.parquet", "full": samples_dir / "full.parquet"}
    needed = ["eval", "full"] if cfg.refit_full else ["eval"]
    for name in needed:
        if not streams[name].exists():
            raise MissingStageInput(f"{streams[name]}: not found; run the sample stage first")
        if pq.ParquetFile(streams[name]).metadata.num_rows == 0:
            raise DataContractError(f"{streams[name]}: no training rows (check split and sample params)")

    key = checkpoint_key(model, cfg, seed, [streams[n] for n in needed] + [examples_path,
                                                                            training_dir / "items.parquet", schema_path])
    ckpt = (checkpoint_dir or out_dir.parent / "model_ckpt") / key
    metrics: dict = {}
    loss_rows: dict[str, list[tuple[int, float, float | None]]] = {}

    def run(name: str, seen_rows: pd.DataFrame, epochs: int | None,
            validation_rows: pd.DataFrame | None = None, full_rows: pd.DataFrame | None = None):
        encoder = FeatureEncoder.fit(schema, items, seen_rows, min_count=model.min_count,
                                     history_length=history_length,
                                     behaviour_counts=model.behaviour_counts)
        catalog = catalog_inputs(encoder, items)
        task = None
        if validation_rows is None:
            # streamed from disk in batches into memory-mapped arrays (bounded memory)
            stream = TrainingStream.from_parquet(encoder, streams[name], items, catalog,
                                                 spill=ckpt / f"{name}_stream", batch_rows=cfg.read_batch_rows)
        else:
            # the validation run filters rows by key, so it holds its stream in memory
            stream_rows = pd.read_parquet(streams["eval"])
            task = ValidationTask.build(encoder, full_rows[outside(full_rows, validation_rows)], validation_rows)
            stream = TrainingStream.build(encoder, stream_rows[outside(stream_rows, validation_rows)], items, catalog)
        result = fit(stream, model_config(encoder, model), cfg, seed, epochs=epochs, validation=task,
                     checkpoint=ckpt / f"{name}.pt", log=_Progress(name))
        metrics[name] = result.summary(len(stream))
        metrics[name]["hard_negatives_per_example"] = round(float((stream.hard > 0).sum(dim=1).float().mean()), 3) \
            if stream.hard.shape[1] else 0.0
        if stream.hard.shape[1] == 0:
            metrics[name]["hard_negatives_note"] = "no hard negatives: ranking logs empty or sample.hard_negatives is 0"
        val = result.val_ndcg or [None] * len(result.losses)
        loss_rows[name] = [(e + 1, round(loss, 6), None if v is None else round(v, 6))
                           for e, (loss, v) in enumerate(zip(result.losses, val))]
        return encoder, result

    epochs = cfg.epochs
    if cfg.early_stopping:
        # with the history lists: validation queries are encoded from their rows
        full_train = pd.read_parquet(examples_path)
        full_train = full_train[full_train["split"] == "train"].reset_index(drop=True)
        val_rows = full_train[carve(full_train, cfg.val_fraction).to_numpy()]
        if len(val_rows):
            _, chosen = run("validation", train_part, None, val_rows, full_train)
            epochs = chosen.best_epoch or cfg.epochs
        else:
            metrics["validation"] = {"skipped": "no user has enough training rows for a validation split"}
    for name in needed:
        seen_rows = train_part if name == "eval" else examples
        encoder, result = run(name, seen_rows, epochs)
        if rank != 0:
            continue
        save_model(out_dir / name, result.model, encoder,
                   extra={"trained_on": streams[name].name, "seed": seed, "train": cfg.model_dump(),
                          "model": model.model_dump(), **metrics[name]})
    if rank != 0:
        return metrics
    if not cfg.refit_full:
        shutil.rmtree(out_dir / "full", ignore_errors=True)
        shutil.copytree(out_dir / "eval", out_dir / "full")
        metrics["full"] = {"copy_of": "eval"}

    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_curves(out_dir / CURVES, loss_rows)
    shutil.rmtree(ckpt, ignore_errors=True)    # done: a rerun with the same key starts afresh
    return metrics
