"""sample stage: the positive streams that train the evaluation model and the refit model, each
example carrying the hard negatives mined for it from the ranking logs."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from flows.errors import DataContractError, MissingStageInput
from models.negatives import NegativePool, load_negative_pool
from models.params import SampleParams
from models.sampling import sample_streams


def _read_examples(training_dir: Path) -> pd.DataFrame:
    src = training_dir / "examples.parquet"
    if not src.exists():
        raise MissingStageInput(f"{src}: not found; run the materialize stage first")
    examples = pd.read_parquet(src)
    for col in ("user_id", "item_id", "split", "timestamp"):
        if col not in examples.columns:
            raise DataContractError(f"{src}: required column '{col}' is missing")
    return examples


def _read_pool(sample_cfg: SampleParams, ranking_logs: Path | None) -> NegativePool:
    if ranking_logs is None or sample_cfg.hard_negatives == 0:
        return NegativePool.none()
    if not ranking_logs.exists():
        raise DataContractError(f"{ranking_logs}: not found; the ingest stage always writes it (0 rows when "
                                "data.ranking_logs is none)")
    return load_negative_pool(ranking_logs, sample_cfg.shown_unclicked_negatives)


def sample(sample_cfg: SampleParams, seed: int, training_dir: Path, ranking_logs: Path | None,
           out_dir: Path) -> dict:
    """Down-sample popular items' positives and attach hard negatives from `ranking_logs`.

    Reads training_dir/examples.parquet and ranking_logs (ingested/ranking_logs.parquet; None or 0 rows:
    no hard negatives); writes out_dir/train.parquet (from split == 'train'), out_dir/full.parquet (all
    rows), each with a `hard_negatives` list column, and out_dir/sample.json."""
    streams = sample_streams(sample_cfg, seed, _read_examples(training_dir), _read_pool(sample_cfg, ranking_logs))
    out_dir.mkdir(parents=True, exist_ok=True)
    streams.train.to_parquet(out_dir / "train.parquet", index=False)
    streams.full.to_parquet(out_dir / "full.parquet", index=False)
    (out_dir / "sample.json").write_text(json.dumps(streams.summary, indent=2) + "\n")
    return streams.summary
