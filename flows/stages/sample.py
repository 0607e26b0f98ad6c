"""sample stage: the positive streams that train the evaluation model and the refit model, each
example carrying the hard negatives mined for it from the ranking logs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from flows.errors import DataContractError, MissingStageInput
from models.params import SampleParams
from models.sampling import downsample_mask

HARD_NEGATIVES_COLUMN = "hard_negatives"


def _with_hard_negatives(stream: pd.DataFrame, positives: pd.DataFrame, pool, cfg: SampleParams,
                         rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    """stream + a `hard_negatives` list column; `positives` are the rows whose items must never be
    negatives of their user (the train part for the evaluation model: test rows stay unseen)."""
    from models.negatives import attach_hard_negatives

    lists = attach_hard_negatives(stream, pool, positives, cfg.hard_negatives, rng)
    out = stream.copy()
    out[HARD_NEGATIVES_COLUMN] = pd.Series(lists.to_pylist(), index=out.index, dtype=object)
    lengths = np.array([len(v) for v in out[HARD_NEGATIVES_COLUMN]], dtype=np.int64)
    stats = {"examples_with_hard_negatives": int((lengths > 0).sum()),
             "mean_hard_negatives": round(float(lengths.mean()), 3) if len(lengths) else 0.0}
    return out, stats


def sample(training_dir: Path, cfg: SampleParams, seed: int, out_dir: Path,
           ranking_logs: Path | None = None) -> dict:
    """Down-sample popular items' positives and attach hard negatives from `ranking_logs`.

    Reads training_dir/examples.parquet and ranking_logs (ingested/ranking_logs.parquet; None or 0 rows:
    no hard negatives); writes out_dir/train.parquet (from split == 'train'), out_dir/full.parquet (all
    rows), each with a `hard_negatives` list column, and out_dir/sample.json."""
    from models.negatives import NegativePool, load_negative_pool

    src = training_dir / "examples.parquet"
    if not src.exists():
        raise MissingStageInput(f"{src}: not found; run the materialize stage first")
    examples = pd.read_parquet(src)
    for col in ("user_id", "item_id", "split", "timestamp"):
        if col not in examples.columns:
            raise DataContractError(f"{src}: required column '{col}' is missing")
    if "weight" not in examples.columns:
        examples["weight"] = 1.0
    # one draw per example row, shared by both streams: a train row kept for the evaluation model
    # is decided by the same coin as in the refit stream (only the frequencies differ)
    uniforms = np.random.default_rng(seed).random(len(examples))
    is_train = (examples["split"] == "train").to_numpy()
    train_part = examples[is_train].reset_index(drop=True)
    keep_train = downsample_mask(train_part["item_id"], cfg.popular_threshold, uniforms[is_train])
    keep_full = downsample_mask(examples["item_id"], cfg.popular_threshold, uniforms)

    if ranking_logs is not None and cfg.hard_negatives > 0:
        pool = load_negative_pool(ranking_logs, cfg.shown_unclicked_negatives)
    else:
        empty = pd.Series([], dtype=object)
        pool = NegativePool(request=np.zeros(0, np.int64), user=empty, item=empty, request_user=empty,
                            request_time=empty, log_rows=0)
    # a separate stream from the positive coins, so turning negatives on keeps the same positives
    rng = np.random.default_rng([seed, 1])
    train_rows, train_stats = _with_hard_negatives(train_part[keep_train].reset_index(drop=True), train_part,
                                                   pool, cfg, rng)
    full_rows, full_stats = _with_hard_negatives(examples[keep_full].reset_index(drop=True), examples,
                                                 pool, cfg, rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows.to_parquet(out_dir / "train.parquet", index=False)
    full_rows.to_parquet(out_dir / "full.parquet", index=False)
    summary = {
        "popular_threshold": cfg.popular_threshold,
        "train": {"rows": int(len(train_part)), "kept": int(keep_train.sum()),
                  "dropped": int((~keep_train).sum()), **train_stats},
        "full": {"rows": int(len(examples)), "kept": int(keep_full.sum()), "dropped": int((~keep_full).sum()),
                 **full_stats},
        "hard_negatives": {
            "per_example": cfg.hard_negatives, "shown_unclicked": cfg.shown_unclicked_negatives,
            "log_rows": pool.log_rows, "pool_rows": int(len(pool.request)),
            "requests": int(len(pool.request_user)),
            "note": None if not pool.empty else "no hard negatives: ranking logs absent, empty, or "
                                                "sample.hard_negatives is 0",
        },
    }
    (out_dir / "sample.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
