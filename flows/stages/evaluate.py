"""evaluate stage: full-catalog Recall@K / NDCG@K of the evaluation model vs. most popular."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from flows.errors import DataContractError, MissingStageInput
from models.params import EvaluateParams


def _model_subdir(model_dir: Path) -> Path:
    """Accept the train stage's out_dir (uses its eval/ model) or a model directory itself."""
    return model_dir / "eval" if (model_dir / "eval" / "model.pt").exists() else model_dir


def holdout(examples: pd.DataFrame, items: pd.DataFrame) -> dict:
    """The evaluation task from examples.parquet: one query row per user with ≥1 held-out catalog item
    not already in their training part, the (user, item) pairs to exclude and the ones to find."""
    from models.encoding import Vocab

    catalog = items.drop_duplicates("item_id").reset_index(drop=True)
    kind = "int64" if pd.api.types.is_integer_dtype(catalog["item_id"]) else "string"
    column = Vocab.fit(catalog["item_id"], kind=kind)   # item id → catalog column + 1 (0: not in catalog)
    train = examples[examples["split"] == "train"]
    test = examples[examples["split"] == "test"]
    seen = pd.DataFrame({"user_id": train["user_id"].to_numpy(), "col": column.lookup(train["item_id"]) - 1})
    target = pd.DataFrame({"user_id": test["user_id"].to_numpy(), "col": column.lookup(test["item_id"]) - 1})
    seen = seen[seen["col"] >= 0].drop_duplicates()
    # an item the user already had in training is excluded from the ranking, so it cannot be a target
    target = target[target["col"] >= 0].drop_duplicates()
    target = target.merge(seen, how="left", indicator=True).query("_merge == 'left_only'").drop(columns="_merge")
    # the query is the user's first test example: its features and recent_items = all history before
    order = test.sort_values("timestamp", kind="stable") if "timestamp" in test.columns else test
    queries = order.drop_duplicates("user_id", keep="first")
    queries = queries[queries["user_id"].isin(target["user_id"])].reset_index(drop=True)
    row = pd.Index(queries["user_id"])
    seen = seen[seen["user_id"].isin(row)]
    return {
        "catalog": catalog,
        "queries": queries,
        "seen": (row.get_indexer(seen["user_id"]), seen["col"].to_numpy()),
        "relevant": (row.get_indexer(target["user_id"]), target["col"].to_numpy()),
        "train_cols": column.lookup(train["item_id"]) - 1,
    }


def evaluate(training_dir: Path, model_dir: Path, cfg: EvaluateParams, out_path: Path) -> dict:
    """Reads training_dir/{examples,items}.parquet and the eval model under model_dir; writes out_path
    (reports/metrics.json): {"two_tower": {...}, "most_popular": {...}, "n_users": ...}."""
    import torch

    from models.baselines import most_popular_scores
    from models.inference import load_bundle
    from models.metrics import full_catalog_metrics

    for name in ("examples.parquet", "items.parquet"):
        if not (training_dir / name).exists():
            raise MissingStageInput(f"{training_dir / name}: not found; run the materialize stage first")
    examples = pd.read_parquet(training_dir / "examples.parquet")
    items = pd.read_parquet(training_dir / "items.parquet")
    for col in ("user_id", "item_id", "split"):
        if col not in examples.columns:
            raise DataContractError(f"{training_dir / 'examples.parquet'}: required column '{col}' is missing")
    task = holdout(examples, items)
    n_users, n_items = len(task["queries"]), len(task["catalog"])
    if n_users == 0:
        raise DataContractError(f"{training_dir / 'examples.parquet'}: no user has a held-out catalog item "
                                "(split == 'test'); check split.test_fraction")

    bundle = load_bundle(_model_subdir(model_dir))
    user_vecs = torch.from_numpy(bundle.encode_users(task["queries"]))      # (U, D)
    item_vecs = torch.from_numpy(bundle.encode_items(task["catalog"]))      # (I, D)
    popularity = most_popular_scores(task["train_cols"][task["train_cols"] >= 0], n_items)  # (I,)
    ks = sorted(set(cfg.ks))
    scorers = {
        "two_tower": lambda s, e: user_vecs[s:e] @ item_vecs.T,             # (b, I)
        "most_popular": lambda s, e: popularity.expand(e - s, -1),          # (b, I)
    }
    result: dict = {name: {k: round(v, 6) for k, v in full_catalog_metrics(
        fn, n_users, n_items, task["seen"], task["relevant"], ks).items()} for name, fn in scorers.items()}
    result["n_users"] = n_users
    result["n_items"] = n_items
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
