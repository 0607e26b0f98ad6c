"""evaluate stage: full-catalog ranking metrics of the evaluation model vs. most popular and EASE."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from flows.errors import DataContractError, MissingStageInput
from models.params import EvaluateParams

METRICS = ("recall", "ndcg", "hitrate", "coverage", "tail_recall")


def _model_subdir(model_dir: Path) -> Path:
    """Accept the train stage's out_dir (uses its eval/ model) or a model directory itself."""
    return model_dir / "eval" if (model_dir / "eval" / "model.pt").exists() else model_dir


def holdout(examples: pd.DataFrame, items: pd.DataFrame) -> dict:
    """The evaluation task from examples (split 'train' / 'test'): one query row per user with ≥1
    held-out catalog item not already in their training part, the (user, item) pairs to exclude and
    the ones to find, and every training (user, item) pair (for baselines fit on the training part)."""
    from models.encoding import Vocab

    catalog = items.drop_duplicates("item_id").reset_index(drop=True)
    kind = "int64" if pd.api.types.is_integer_dtype(catalog["item_id"]) else "string"
    column = Vocab.fit(catalog["item_id"], kind=kind)   # item id → catalog column + 1 (0: not in catalog)
    train = examples[examples["split"] == "train"]
    test = examples[examples["split"] == "test"]
    train_cols = column.lookup(train["item_id"]) - 1
    seen = pd.DataFrame({"user_id": train["user_id"].to_numpy(), "col": train_cols})
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
    train_users = pd.factorize(seen["user_id"])[0]
    query_seen = seen[seen["user_id"].isin(row)]
    return {
        "catalog": catalog,
        "queries": queries,
        "seen": (row.get_indexer(query_seen["user_id"]), query_seen["col"].to_numpy()),
        "relevant": (row.get_indexer(target["user_id"]), target["col"].to_numpy()),
        "train_cols": train_cols,
        "train_pairs": (train_users, seen["col"].to_numpy()),   # all users' catalog items in training
    }


def ease_baseline(task: dict, examples: pd.DataFrame, items: pd.DataFrame, cfg: EvaluateParams,
                  ks: list[int], source: Path) -> dict:
    """EASE with λ picked by validation NDCG@min(ks) on a split carved from the training part, refit on
    the whole training part. Skipped (with the reason) above cfg.ease_max_items."""
    from models.baselines import binary_matrix, ease_memory_gb, ease_scorer, ease_weights, gram
    from models.metrics import full_catalog_metrics
    from models.split import temporal_split

    n_items = len(task["catalog"])
    if not cfg.ease or n_items > cfg.ease_max_items:
        reason = ("evaluate.ease is false" if not cfg.ease else
                  f"catalog has {n_items} items > evaluate.ease_max_items={cfg.ease_max_items} (the closed "
                  f"form needs ~{ease_memory_gb(n_items):.1f} GB and O(items³) time)")
        return {"ease": {"skipped": reason}, "ease_lambda": None}
    if "timestamp" not in examples.columns:
        raise DataContractError(f"{source}: column 'timestamp' is needed to carve EASE's validation split "
                                "(or set evaluate.ease: false)")
    train = examples[examples["split"] == "train"].reset_index(drop=True)
    val_examples = train.assign(split=temporal_split(train, cfg.validation))
    val = holdout(val_examples, items)
    tune_at = f"ndcg@{ks[0]}"
    scan: dict[str, float] = {}
    if len(val["queries"]) > 0 and len(cfg.ease_lambdas) > 1:
        g = gram(binary_matrix(*val["train_pairs"], _n_rows(val["train_pairs"][0]), n_items))
        queries = binary_matrix(*val["seen"], len(val["queries"]), n_items)
        for lam in cfg.ease_lambdas:
            m = full_catalog_metrics(ease_scorer(ease_weights(g, lam), queries), len(val["queries"]), n_items,
                                     val["seen"], val["relevant"], [ks[0]], metrics=("ndcg",))
            scan[f"{lam:g}"] = round(m[tune_at], 6)
        best = max(cfg.ease_lambdas, key=lambda lam: scan[f"{lam:g}"])   # first of equal scores
    else:
        best = cfg.ease_lambdas[0]
    b = ease_weights(gram(binary_matrix(*task["train_pairs"], _n_rows(task["train_pairs"][0]), n_items)), best)
    queries = binary_matrix(*task["seen"], len(task["queries"]), n_items)
    tail = _tail(task, n_items, cfg)
    metrics = full_catalog_metrics(ease_scorer(b, queries), len(task["queries"]), n_items, task["seen"],
                                   task["relevant"], ks, metrics=METRICS, tail=tail)
    # no timings here: metrics.json is a DVC metric, and equal inputs must give an equal file
    return {"ease": _rounded(metrics), "ease_lambda": best,
            "ease_validation": {"metric": tune_at, "users": len(val["queries"]), "by_lambda": scan}}


def _n_rows(codes: np.ndarray) -> int:
    return int(codes.max()) + 1 if len(codes) else 0


def _tail(task: dict, n_items: int, cfg: EvaluateParams) -> np.ndarray:
    from models.metrics import tail_items
    cols = task["train_cols"]
    return tail_items(cols[cols >= 0], n_items, head_share=1.0 - cfg.tail_share)


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in metrics.items()}


def evaluate(training_dir: Path, model_dir: Path, cfg: EvaluateParams, out_path: Path) -> dict:
    """Reads training_dir/{examples,items}.parquet and the eval model under model_dir; writes out_path
    (reports/metrics.json): {"two_tower": {...}, "most_popular": {...}, "ease": {...}, "ease_lambda",
    "ease_validation", "n_users", "n_items", "n_tail_items"}; each model's metrics are recall, ndcg,
    hitrate, coverage and tail_recall at every K of cfg.ks (see models/metrics.py)."""
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
    tail = _tail(task, n_items, cfg)
    scorers = {
        "two_tower": lambda s, e: user_vecs[s:e] @ item_vecs.T,             # (b, I)
        "most_popular": lambda s, e: popularity.expand(e - s, -1),          # (b, I)
    }
    result: dict = {name: _rounded(full_catalog_metrics(fn, n_users, n_items, task["seen"], task["relevant"],
                                                        ks, metrics=METRICS, tail=tail))
                    for name, fn in scorers.items()}
    result.update(ease_baseline(task, examples, items, cfg, ks, training_dir / "examples.parquet"))
    result["n_users"] = n_users
    result["n_items"] = n_items
    result["n_tail_items"] = int(tail.sum())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
