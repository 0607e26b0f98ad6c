"""`towerflow rank negatives`: does the debiased ranker pick better hard negatives for retrieval?

The sample stage mines hard negatives from the ranking logs: items retrieval returned that the logging
ranker did not show (log stage retrieved/ranked). Here the served ranker of the rank stage re-scores
those items and only the ones it scores low (below the median of their request's unshown items) stay
hard negatives: fewer false negatives, if the ranker knows relevance better than the logger did.

The sample stage runs before the rank stage, so feeding it the ranker's choice inside the pipeline would
make a cycle (sample → train → rank → sample). This is an ablation instead: the real sample → train →
evaluate stages rerun in a temporary copy (flows/experiments/ablation.py), once with the logs' hard
negatives and once with the ranker's, with extra negatives switched on (train.negatives defaults to 0,
which uses no hard negatives at all). Writes <out_dir>/ranker_negatives.{json,md}.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from models.parquet_stream import open_stream

from flows.errors import MissingStageInput

UNSHOWN = ("retrieved", "ranked")


def _keep_low(table: pa.Table, ranker: Any) -> pa.Table:
    """Shown rows, and the unshown rows the ranker scores below their request's median."""
    df = table.select(["request_id", "user_id", "item_id", "stage"]).to_pandas()
    unshown = df["stage"].isin(UNSHOWN).to_numpy()
    score = np.full(len(df), np.nan)
    score[unshown] = ranker.score(df["user_id"].to_numpy()[unshown], df["item_id"].to_numpy()[unshown])
    median = pd.Series(score).groupby(df["request_id"].to_numpy()).transform("median").to_numpy()
    return table.filter(pa.array(~unshown | (score < median)))


def _split_last_request(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The table without its last request's rows, and those rows (they may continue in the next batch)."""
    req = table["request_id"].to_numpy(zero_copy_only=False)
    start = int(np.flatnonzero(req != req[-1])[-1]) + 1 if (req != req[-1]).any() else 0
    return table.slice(0, start), table.slice(start)


def ranker_logs(logs: Path, ranker_dir: Path, out: Path, read_rows: int = 1 << 20) -> dict[str, int]:
    """Rewrite `logs` to `out` keeping the ranker's low-scored unshown items (streamed: rows of one
    request are adjacent, the last request of a batch waits for the next batch)."""
    from flows.serving.rerank import load_reranker

    ranker = load_reranker(ranker_dir)
    file = open_stream(logs)
    rows_in, rows_out, carry = 0, 0, None
    with pq.ParquetWriter(out, file.schema_arrow) as writer:
        for rb in file.iter_batches(batch_size=read_rows):
            table = pa.Table.from_batches([rb])
            rows_in += table.num_rows
            if carry is not None:
                table = pa.concat_tables([carry, table])
            table, carry = _split_last_request(table)
            kept = _keep_low(table, ranker)
            writer.write_table(kept)
            rows_out += kept.num_rows
        if carry is not None and carry.num_rows:
            kept = _keep_low(carry, ranker)
            writer.write_table(kept)
            rows_out += kept.num_rows
    return {"log_rows": rows_in, "kept_rows": rows_out}


def ranker_negatives(raw: dict[str, Any], root: Path, out_dir: Path, seeds: list[int],
                     common: list[str] | None = None) -> dict:
    """Three rows × seeds: no extra negatives (params.yaml), the logs' hard negatives, the ranker's."""
    from flows.experiments.ablation import AblationRow, ablate
    from flows.params import apply_overrides, validate_params

    params = validate_params(apply_overrides(raw, common or []), origin="rank negatives")
    paths = params.paths.resolved(root)
    if not (paths.ranker / "model.pt").exists():
        raise MissingStageInput(f"{paths.ranker / 'model.pt'}: not found; run the rank stage first")
    extra = [f"train.negatives={params.train.negatives or 16}", f"train.hard_ratio={params.train.hard_ratio or 0.5}"]
    with tempfile.TemporaryDirectory(prefix="towerflow-ranker-negatives-") as tmp:
        ingested = Path(tmp) / "ingested"
        shutil.copytree(paths.ingested, ingested, ignore=shutil.ignore_patterns("ranking_logs.parquet"))
        rewrite = ranker_logs(paths.ingested / "ranking_logs.parquet", paths.ranker,
                              ingested / "ranking_logs.parquet")
        rows = [AblationRow("baseline", [], "params.yaml as is"),
                AblationRow("log_hard_negatives", extra, "hard negatives: unshown items of the log"),
                AblationRow("ranker_hard_negatives", [*extra, f"paths.ingested={ingested}"],
                            "hard negatives: unshown items the debiased ranker scores below its request's median")]
        summary = ablate(raw, root, Path(tmp) / "out", seeds, common=common, rows=rows)
    summary["ranker_logs"] = rewrite
    _write(summary, out_dir)
    return summary


def _write(summary: dict, out_dir: Path) -> None:
    from flows.experiments.ablation import markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ranker_negatives.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary).replace("# Ablation: two-tower", "# Hard negatives from the debiased ranker")
    kept = summary["ranker_logs"]
    (out_dir / "ranker_negatives.md").write_text(
        text + f"\nRanker-filtered log: {kept['kept_rows']} of {kept['log_rows']} rows kept.\n")
