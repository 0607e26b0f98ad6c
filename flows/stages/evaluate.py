"""evaluate stage: full-catalog ranking metrics of the evaluation model vs. most popular and EASE
(models/evaluation.py) on the test split of data/training, and of the live model on the same split
(flows/reports/champion.py: the gate's quality comparison)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from flows.errors import DataContractError, MissingStageInput
from flows.reports.champion import champion_report
from flows.reports.live import live_bundle
from models.device import resolve_device
from models.encoding import HISTORY_COLUMN, read_rows, read_scalar_columns
from models.errors import ModelInputError, ModelNotFound
from models.evaluation import evaluation_report, holdout_recommendations
from models.holdout import CatalogTask, catalog_task, sample_queries
from models.inference import TwoTowerBundle, load_bundle
from models.params import EvaluateParams

ROW = "_example_row"     # an example's row number in examples.parquet, carried to the queries


def _model_subdir(model_dir: Path) -> Path:
    """Accept the train stage's out_dir (uses its eval/ model) or a model directory itself."""
    return model_dir / "eval" if (model_dir / "eval" / "model.pt").exists() else model_dir


def _read_training(training_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    for name in ("examples.parquet", "items.parquet"):
        if not (training_dir / name).exists():
            raise MissingStageInput(f"{training_dir / name}: not found; run the materialize stage first")
    # only the queried users' rows need their history lists (_with_history)
    examples = read_scalar_columns(training_dir / "examples.parquet")
    examples[ROW] = np.arange(len(examples))
    items = pd.read_parquet(training_dir / "items.parquet")
    for col in ("user_id", "item_id", "split"):
        if col not in examples.columns:
            raise DataContractError(f"{training_dir / 'examples.parquet'}: required column '{col}' is missing")
    return examples, items


def _with_history(task: CatalogTask, source: Path, batch_rows: int = 200_000) -> CatalogTask:
    """The task with its queries' history lists, read from `source` for those rows alone (their row
    numbers in the ROW column, dropped here): memory grows with the queried users, not the examples."""
    queries = task.queries.drop(columns=ROW)
    if HISTORY_COLUMN in pq.read_schema(source).names:
        lists = read_rows(source, task.queries[ROW].to_numpy(), [HISTORY_COLUMN], batch_rows)
        queries[HISTORY_COLUMN] = lists[HISTORY_COLUMN].to_numpy()
    return replace(task, queries=queries)


def _test_task(examples: pd.DataFrame, items: pd.DataFrame, source: Path) -> CatalogTask:
    task = catalog_task(examples, items)
    if task.n_users == 0:
        raise DataContractError(f"{source}: no user has a held-out catalog item (split == 'test'); "
                                "check split.min_user_interactions and split.test_fraction")
    return task


def _read_model(model_dir: Path, device: str) -> TwoTowerBundle:
    try:
        return load_bundle(_model_subdir(model_dir), resolve_device(device))
    except ModelNotFound as exc:
        raise MissingStageInput(f"{exc}; run the train stage first") from exc


def evaluate(eval_cfg: EvaluateParams, training_dir: Path, model_dir: Path, out_path: Path,
             recs_path: Path | None = None, published_dir: Path | None = None, schema_path: Path | None = None,
             champion_path: Path | None = None, device: str = "cpu") -> dict:
    """Reads training_dir/{examples,items}.parquet and the eval model under model_dir; writes out_path
    (reports/metrics.json): {"two_tower": {...}, "most_popular": {...}, "ease": {...}, "ease_lambda",
    "ease_validation", "n_users", "n_items", "n_tail_items"}; each model's metrics are recall, ndcg,
    hitrate, coverage and tail_recall at every K of eval_cfg.ks (see models/metrics.py). With
    recs_path, also writes the two-tower's holdout recommendations there (parquet: user_id, item_id,
    rank, score, target; the top max(ks) per user and the held-out items outside it), which the
    report stage measures with Evidently. With champion_path, also scores the model live in
    published_dir (read when the stage runs, as the report stage does) on the same holdout and writes
    champion_path (reports/champion.json, see flows/reports/champion.py; schema_path: this run's
    ingested schema.json, its source and contract). A model whose vectors are not finite is refused.
    device: where the model encodes the queries and the catalog (train.device: auto | cpu | cuda)."""
    examples, items = _read_training(training_dir)
    source = training_dir / "examples.parquet"
    full = _test_task(examples, items, source)
    task = _with_history(sample_queries(full, eval_cfg.max_users), source)
    del examples[ROW]    # in place: drop() would copy every column of the examples
    bundle = _read_model(model_dir, device)
    live = live_bundle(published_dir) if champion_path is not None and published_dir is not None else None
    try:
        # per-user figures only when a live model will be scored beside this one on the same users
        result, per_user = evaluation_report(eval_cfg, task, bundle, examples, items, per_user=live is not None)
        recs = holdout_recommendations(bundle, task, max(eval_cfg.ks)) if recs_path is not None else None
    except ModelInputError as exc:
        raise DataContractError(f"{source}: {exc}") from exc
    if task.n_users < full.n_users:
        result["users_sampled"] = (f"{task.n_users} of {full.n_users} held-out users (evaluate.max_users), the "
                                   "same for every model: full-catalog scoring costs users x items")
    _write_json(out_path, result)
    if recs is not None:
        recs_path.parent.mkdir(parents=True, exist_ok=True)
        recs.to_parquet(recs_path, index=False)
    if champion_path is not None:
        _write_json(champion_path, champion_report(eval_cfg, task, result["two_tower"], live,
                                                   _read_schema(schema_path), per_user))
    return result


def _read_schema(schema_path: Path | None) -> dict:
    if schema_path is None:
        return {}
    if not schema_path.is_file():
        raise MissingStageInput(f"{schema_path}: not found; run the ingest stage first")
    return json.loads(schema_path.read_text())


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
