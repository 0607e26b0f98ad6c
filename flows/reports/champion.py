"""The live model (the champion) scored on this run's holdout, beside this run's evaluation model.

The gate compares the two on one test set: the same queried users, the same catalog, the same
exclusions and the same metric code (models/metrics.py `scorer_metrics`). A figure the live bundle
recorded on its own run's holdout is never compared with this run's: two test sets.

What is scored is the live bundle's evaluation model (eval_model/, flows/reports/live.py): the served
model was refit on every row of its run, most of this run's holdout included, and would be scored on
rows it learned. The evaluation model was trained without its run's holdout, and so without this
one's while the source only grows by newer rows (a user's held-out rows are their newest). A bundle
that keeps no evaluation model has its served model scored only when that model's data ends before
this holdout starts.

Users and items the live model never saw get its cold-start answer (out-of-vocabulary ids, their
features and history where it reads them: models/encoding.py), and the output counts them. A live
model that cannot be scored on this data at all (another id type, no item of this catalog known to
it, feature columns this data lacks, a model file it cannot load) is "not compared", with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.reports.live import EVAL_MODEL, LiveBundle, lineage, lineage_change
from models.errors import ModelError
from models.evaluation import two_tower_scorer
from models.holdout import CatalogTask
from models.inference import TwoTowerBundle, load_bundle
from models.metrics import paired_errors, rounded, scorer_figures
from models.params import EvaluateParams

NO_LIVE = "no previous published model"


def champion_report(eval_cfg: EvaluateParams, task: CatalogTask, challenger: dict[str, float],
                    live: LiveBundle | None, schema: dict[str, Any],
                    challenger_users: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """reports/champion.json: {"compared", "live_version", "lineage", "scored" (the bundle's folder:
    eval_model or model), "challenger", and either "metrics" (the live model's figures on this
    holdout), "difference_errors", "n_users", "n_items", "cold_users", "cold_items", "cold_targets", or
    "reason" (why it was not scored)}. challenger: this run's two_tower figures (metrics.json);
    challenger_users: their per-user values (models.metrics.Figures.users), which give
    "difference_errors": each figure's standard error of the live - challenger difference over the
    same users (metrics.paired_errors), how far a drop can come from the holdout's sample alone."""
    if live is None:
        return {"compared": False, "live_version": None, "reason": NO_LIVE, "challenger": challenger}
    current = lineage(schema)
    recorded = live.lineage()
    out: dict[str, Any] = {"live_version": live.version, "challenger": challenger,
                           "lineage": {"this_run": current, "live": recorded,
                                       "change": lineage_change(current, recorded, live.version)}}
    model, scored, why = _load(live, task)
    out["scored"] = scored
    why = why or _incompatible(model.encoder, task)
    if why is None:
        try:
            figures = scorer_figures(eval_cfg, task, two_tower_scorer(model, task), per_user=bool(challenger_users))
            out["metrics"] = figures.means
            if challenger_users:
                out["difference_errors"] = rounded(paired_errors(challenger_users, figures.users))
        except ModelError as exc:      # its vectors are not finite on this data
            why = f"the live model {live.version} cannot be scored on this run's data: {exc}"
    if why is not None:
        return {**out, "compared": False, "reason": why}
    return {**out, "compared": True, **cold_counts(model, task)}


def _load(live: LiveBundle, task: CatalogTask) -> tuple[TwoTowerBundle | None, str, str | None]:
    """(the model to score, which folder of the bundle it is, None) or (None, folder, why not)."""
    folder = EVAL_MODEL if (live.path / EVAL_MODEL / "model.pt").is_file() else "model"
    try:
        model = load_bundle(live.path / folder)
    except Exception as exc:   # a foreign or truncated model file: not comparable, say which
        return None, folder, f"the live model {live.version} cannot be loaded ({type(exc).__name__}: {exc})"
    if folder == "model":
        until = (live.json(f"{folder}/model.json") or {}).get("data_until")
        starts = pd.to_datetime(task.queries["timestamp"], utc=True).min() if "timestamp" in task.queries else None
        if starts is not None and (until is None or pd.Timestamp(until) >= starts):
            end = f"trained on data until {until}, into" if until else "does not say whether it trained on"
            return None, folder, (f"the live bundle {live.version} keeps no evaluation model, and its served "
                                  f"model {end} this run's holdout (from {starts.isoformat()}): its figure "
                                  "would be optimistic")
    return model, folder, None


def _id_kind(ids: pd.Series) -> str:
    return "int64" if pd.api.types.is_integer_dtype(ids) else "string"


def _incompatible(encoder: Any, task: CatalogTask) -> str | None:
    """Why the live model cannot be scored on this task (another id space, features this data lacks);
    None when it can."""
    for what, vocab, ids in (("item", encoder.item_ids, task.catalog["item_id"]),
                             ("user", encoder.user_ids, task.queries["user_id"])):
        if vocab.kind != _id_kind(ids):
            return (f"another id space: the live model's {what} ids are {vocab.kind}, this run's are "
                    f"{_id_kind(ids)}")
    if not (encoder.item_ids.lookup(task.catalog["item_id"]) > 0).any():
        return f"another id space: none of this run's {task.n_items} items is known to the live model"
    for what, side, frame in (("user", encoder.users, task.queries), ("item", encoder.items, task.catalog)):
        reads = [c for kind in (side.categorical, side.numeric, side.multi) for c in kind]
        missing = [c for c in reads if c not in frame.columns]
        if missing:
            return (f"another feature set: the live model reads {what} columns {missing} that this run's "
                    "data does not have")
    return None


def cold_counts(model: TwoTowerBundle, task: CatalogTask) -> dict[str, int]:
    """How much of this holdout the live model answers cold: queried users and catalog items it never
    saw, and held-out targets that are such items."""
    encoder = model.encoder
    cold_item = encoder.item_ids.lookup(task.catalog["item_id"]) == 0          # (I,)
    cold_user = encoder.user_ids.lookup(task.queries["user_id"]) == 0          # (U,)
    return {"n_users": task.n_users, "n_items": task.n_items, "cold_users": int(cold_user.sum()),
            "cold_items": int(cold_item.sum()), "cold_targets": int(cold_item[task.relevant[1]].sum())}

