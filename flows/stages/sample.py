"""sample stage: the positive streams that train the evaluation model and the refit model, each
example carrying the hard negatives mined for it from the ranking logs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from flows.errors import DataContractError, MissingStageInput
from models.negatives import NegativePool, load_negative_pool
from models.params import SampleParams
from models.sampling import KEY_COLUMNS, write_sampled_streams


def _examples_file(training_dir: Path) -> Path:
    src = training_dir / "examples.parquet"
    if not src.exists():
        raise MissingStageInput(f"{src}: not found; run the materialize stage first")
    names = pq.read_schema(src).names
    for col in KEY_COLUMNS:
        if col not in names:
            raise DataContractError(f"{src}: required column '{col}' is missing")
    return src


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
    summary = write_sampled_streams(sample_cfg, seed, _examples_file(training_dir),
                                    _read_pool(sample_cfg, ranking_logs), out_dir)
    (out_dir / "sample.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
