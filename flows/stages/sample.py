"""sample stage: the positive streams that train the evaluation model and the refit model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from flows.errors import DataContractError, MissingStageInput
from models.params import SampleParams
from models.sampling import downsample_mask


def sample(training_dir: Path, cfg: SampleParams, seed: int, out_dir: Path) -> dict:
    """Down-sample popular items' positives. Reads training_dir/examples.parquet; writes
    out_dir/train.parquet (from split == 'train'), out_dir/full.parquet (all rows), out_dir/sample.json."""
    src = training_dir / "examples.parquet"
    if not src.exists():
        raise MissingStageInput(f"{src}: not found; run the materialize stage first")
    examples = pd.read_parquet(src)
    for col in ("user_id", "item_id", "split"):
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

    out_dir.mkdir(parents=True, exist_ok=True)
    train_part[keep_train].reset_index(drop=True).to_parquet(out_dir / "train.parquet", index=False)
    examples[keep_full].reset_index(drop=True).to_parquet(out_dir / "full.parquet", index=False)
    summary = {
        "popular_threshold": cfg.popular_threshold,
        "train": {"rows": int(len(train_part)), "kept": int(keep_train.sum()),
                  "dropped": int((~keep_train).sum())},
        "full": {"rows": int(len(examples)), "kept": int(keep_full.sum()), "dropped": int((~keep_full).sum())},
    }
    (out_dir / "sample.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
