"""train stage: fit the evaluation model on train.parquet and the refit model on full.parquet."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas as pd

from flows.errors import DataContractError, MissingStageInput
from models.params import ModelParams, TrainParams


def _read(path: Path, upstream: str) -> pd.DataFrame:
    if not path.exists():
        raise MissingStageInput(f"{path}: not found; run the {upstream} stage first")
    return pd.read_parquet(path)


def train(samples_dir: Path, training_dir: Path, schema_path: Path, model: ModelParams, cfg: TrainParams,
          seed: int, out_dir: Path) -> dict:
    """Writes out_dir/eval/ and out_dir/full/ (model.pt, encoder.json, model.json), out_dir/train_metrics.json
    and out_dir/loss.csv (epoch, model, loss). full/ is a refit on all rows when cfg.refit_full, else a
    copy of eval/. Vocabularies: the whole catalog (items.parquet) + users and user feature values of the
    examples the model may see (split == 'train' for eval, all rows for full)."""
    import torch

    from models.encoding import FeatureEncoder
    from models.training import TrainingStream, fit, model_config, save_model

    torch.set_num_threads(cfg.threads)
    if not schema_path.exists():
        raise MissingStageInput(f"{schema_path}: not found; run the ingest stage first")
    schema = json.loads(schema_path.read_text())
    items = _read(training_dir / "items.parquet", "materialize")
    examples = _read(training_dir / "examples.parquet", "materialize")
    if "split" not in examples.columns:
        raise DataContractError(f"{training_dir / 'examples.parquet'}: required column 'split' is missing")

    runs = [("eval", samples_dir / "train.parquet", examples[examples["split"] == "train"])]
    if cfg.refit_full:
        runs.append(("full", samples_dir / "full.parquet", examples))
    metrics: dict = {}
    loss_rows: list[tuple[int, str, float]] = []
    for name, stream_path, seen_rows in runs:
        stream_rows = _read(stream_path, "sample")
        if len(stream_rows) == 0:
            raise DataContractError(f"{stream_path}: no training rows (check split and sample params)")
        encoder = FeatureEncoder.fit(schema, items, seen_rows, min_count=model.min_count)
        stream = TrainingStream.build(encoder, stream_rows, items)
        result = fit(stream, model_config(encoder, model), cfg, seed)
        metrics[name] = result.summary(len(stream))
        save_model(out_dir / name, result.model, encoder,
                   extra={"trained_on": stream_path.name, "seed": seed, "train": cfg.model_dump(),
                          "model": model.model_dump(), **metrics[name]})
        loss_rows += [(epoch + 1, name, round(loss, 6)) for epoch, loss in enumerate(result.losses)]
    if not cfg.refit_full:
        shutil.rmtree(out_dir / "full", ignore_errors=True)
        shutil.copytree(out_dir / "eval", out_dir / "full")
        metrics["full"] = {"copy_of": "eval"}

    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "loss.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "model", "loss"])
        writer.writerows(loss_rows)
    return metrics
