"""Evidently's recsys metrics on the holdout recommendations of a run (models/evaluation.py writes
them), saved as HTML, and flattened into figures: {"ndcg@20": ..., "novelty@20": ...}.

The recommendations hold each queried user's top-K items and also the held-out items the model did
not rank in its top K (with their scores), so that Evidently's recall counts every relevant item.
Predictions are the model's scores (recommendations_type "score": Evidently ranks them per user, and
ScoreDistribution is only defined for scores).
"""
from __future__ import annotations

import gc
import html
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from evidently import DataDefinition, Dataset, Recsys, Report
from evidently.metrics import (
    MAP,
    MRR,
    NDCG,
    Diversity,
    FBetaTopK,
    HitRate,
    Novelty,
    Personalization,
    PopularityBiasMetric,
    PrecisionTopK,
    RecallTopK,
    RecCasesTable,
    ScoreDistribution,
    Serendipity,
)

from flows.errors import DataContractError
from flows.reports.diversity import DiversitySample
from flows.reports.drift import put_at_top
from models.fork_pool import run_jobs

RECS_COLUMNS = ("user_id", "item_id", "score", "target")
# Evidently metric type (the end of config.type) → figure name
TOP_K = {"PrecisionTopK": "precision", "RecallTopK": "recall", "FBetaTopK": "f1", "MAP": "map",
         "NDCG": "ndcg", "MRR": "mrr", "HitRate": "hitrate"}
SINGLE = {"ScoreDistribution": "score_entropy", "Personalization": "personalization", "Novelty": "novelty",
          "Diversity": "diversity", "Serendipity": "serendipity"}


def check_recs(recs: pd.DataFrame, source: Path, k: int) -> None:
    missing = [c for c in RECS_COLUMNS if c not in recs.columns]
    if missing:
        raise DataContractError(f"{source}: columns {missing} are missing (has {list(recs.columns)})")
    if recs.empty or not (recs["target"] > 0).any():
        raise DataContractError(f"{source}: no held-out item to find, nothing to measure")
    deepest = int(recs.groupby("user_id").size().max())
    if deepest < k:
        raise DataContractError(f"{source}: holds at most {deepest} items per user, fewer than report.k={k}")


def quality_report(recs: pd.DataFrame, train: pd.DataFrame, item_vectors: pd.DataFrame | None, k: int,
                   html_path: Path, reference: pd.DataFrame | None = None,
                   diversity: DiversitySample | None = None, workers: int = 1) -> tuple[dict[str, float], dict[str, str]]:
    """Run RecsysPreset(k)'s metrics (+ popularity gini and coverage) on recs, with train (user_id,
    item_id: what the model learned from) for Novelty, Serendipity and popularity bias, and
    item_vectors (item_id + numeric feature columns, or None) for Diversity and Serendipity.
    reference: the previous published run's recommendations, shown beside this run's in the HTML.
    Returns (figures, not computed: {figure: reason}): a metric that raises on this data (Novelty's
    histogram on a catalog where every item was seen once) is left out of the page and named, and
    the others are still computed. diversity (flows/reports/diversity.py): Diversity and Serendipity
    on those users only, in a report of their own (the page shows them in the figures table), run
    beside the main one in a forked process when workers > 1 (the same figures either way). A figure
    Evidently gives as NaN is not computed too (quality.json stays strict JSON)."""
    figures, not_computed = _quality_report(recs, train, item_vectors, k, html_path, reference, diversity, workers)
    for name, value in list(figures.items()):
        if not math.isfinite(value):
            # Serendipity averages over the relevant items in the top K: a model that found none has none
            del figures[name]
            not_computed[name] = (f"not defined on this data (Evidently gave {value}): no held-out item in any "
                                  f"top {k}" if not any(figures.get(f"{m}@{k}") for m in ("recall", "hitrate"))
                                  else f"Evidently gave {value} on this data")
    return figures, not_computed


def _quality_report(recs: pd.DataFrame, train: pd.DataFrame, item_vectors: pd.DataFrame | None, k: int,
                    html_path: Path, reference: pd.DataFrame | None, diversity: DiversitySample | None,
                    workers: int) -> tuple[dict[str, float], dict[str, str]]:
    if diversity is not None and item_vectors is not None:
        runs = _Runs(recs, train, item_vectors, k, html_path, reference, diversity)
        if diversity.users == 0:
            figures, not_computed = _main_run(runs)
            return figures, {**not_computed, **{f"{m}@{k}": diversity.note for m in ("diversity", "serendipity")}}
        (figures, not_computed), (sampled, failed) = run_jobs(
            [("quality report", _main_run), ("diversity and serendipity", _pairwise_run)], runs, workers, 1)
        return dict(sorted({**figures, **sampled}.items())), {**not_computed, **failed}
    features = [c for c in item_vectors.columns if c != "item_id"] if item_vectors is not None else []
    ranking = Recsys(user_id="user_id", item_id="item_id", target="target", prediction="score",
                     recommendations_type="score")
    definition = DataDefinition(numerical_columns=["score", *features], ranking=[ranking])
    train_rows = _with_features(train[["user_id", "item_id"]], item_vectors)
    cur = Dataset.from_pandas(_with_features(recs, item_vectors), data_definition=definition)
    ref = None
    if reference is not None:
        ref = Dataset.from_pandas(_with_features(reference[list(RECS_COLUMNS)], item_vectors),
                                  data_definition=definition)
    extra = {"current_train_data": Dataset.from_pandas(train_rows, data_definition=DataDefinition(
        numerical_columns=features))}

    def run(metrics: list[Any]) -> Any:
        with _evidently_warnings():
            return Report(metrics).run(cur, ref, additional_data=extra)

    metrics = _metrics(k, features)
    not_computed: dict[str, str] = {}
    try:
        snapshot = run([m for _, m in metrics])
    except Exception:  # noqa: BLE001 - which metric failed is found below, each on its own
        kept = []
        for name, metric in metrics:
            try:
                run([metric])
                kept.append(metric)
            except Exception as exc:  # noqa: BLE001 - Evidently raises plain errors from numpy/pandas
                not_computed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        snapshot = run(kept) if kept else None
    html_path.parent.mkdir(parents=True, exist_ok=True)
    if snapshot is None:
        html_path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>Model quality</title></head>"
                             "<body><p>No quality metric could be computed on this data.</p></body></html>\n")
        return {}, not_computed
    snapshot.save_html(str(html_path))
    return flatten(snapshot.dict(), k), not_computed


@contextmanager
def _evidently_warnings() -> Iterator[None]:
    """Around an Evidently run: its legacy recsys code's pandas FutureWarnings, and numpy's warnings of
    a model that found nothing (F-beta's 0 / 0, read as 0 in flatten; Serendipity's mean over no hit,
    not computed in quality_report): nothing a reader of the run's log can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for message in ("invalid value encountered in (scalar )?divide", "Mean of empty slice"):
            warnings.filterwarnings("ignore", message, RuntimeWarning)
        yield


@dataclass(frozen=True)
class _Runs:
    """What the two reports of a sampled quality report read (forked workers inherit it, unpickled)."""
    recs: pd.DataFrame
    train: pd.DataFrame
    item_vectors: pd.DataFrame
    k: int
    html_path: Path
    reference: pd.DataFrame | None
    diversity: DiversitySample


def _main_run(runs: _Runs) -> tuple[dict[str, float], dict[str, str]]:
    """Every figure but Diversity and Serendipity, on every user, into the HTML page."""
    return quality_report(runs.recs, runs.train, None, runs.k, runs.html_path, runs.reference)


def _pairwise_run(runs: _Runs) -> tuple[dict[str, float], dict[str, str]]:
    return _pairwise_figures(runs.diversity, runs.item_vectors, runs.k)


def _pairwise_figures(sample: DiversitySample, item_vectors: pd.DataFrame, k: int) -> tuple[dict[str, float],
                                                                                         dict[str, str]]:
    """Diversity and Serendipity of the sampled users (their recommendations and training rows)."""
    features = [c for c in item_vectors.columns if c != "item_id"]
    ranking = Recsys(user_id="user_id", item_id="item_id", target="target", prediction="score",
                     recommendations_type="score")
    cur = Dataset.from_pandas(_with_features(sample.recs[list(RECS_COLUMNS)], item_vectors),
                              data_definition=DataDefinition(numerical_columns=["score", *features], ranking=[ranking]))
    train = Dataset.from_pandas(_with_features(sample.train[["user_id", "item_id"]], item_vectors),
                                data_definition=DataDefinition(numerical_columns=features))
    figures: dict[str, float] = {}
    failed: dict[str, str] = {}
    for metric in (Diversity(k=k, item_features=features), Serendipity(k=k, item_features=features)):
        name = f"{SINGLE[type(metric).__name__]}@{k}"
        try:
            with _evidently_warnings():
                snapshot = Report([metric]).run(cur, None, additional_data={"current_train_data": train})
            figures.update(flatten(snapshot.dict(), k))
        except Exception as exc:  # noqa: BLE001 - Evidently raises plain errors from numpy/pandas
            failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        # each run's snapshot holds its items x items distance matrix (and reference cycles): let it go
        # before the next metric builds its own, so the stage holds one, not two (1.9 -> 0.9 GB at 7.6k items)
        snapshot = None
        gc.collect()
    return figures, failed


def _metrics(k: int, features: list[str]) -> list[tuple[str, Any]]:
    """(figure name, metric): RecsysPreset(k)'s metrics one by one (so each can fail alone), the
    recommendation cases table, and popularity bias as gini and coverage."""
    top_k = [cls(k=k) for cls in (PrecisionTopK, RecallTopK, FBetaTopK, MAP, NDCG, MRR, HitRate)]
    single = [ScoreDistribution(k=k), Personalization(k=k), Novelty(k=k)]
    if features:
        single += [Diversity(k=k, item_features=features), Serendipity(k=k, item_features=features)]
    named = [(f"{({**TOP_K, **SINGLE})[type(m).__name__]}@{k}", m) for m in top_k + single]
    named += [(f"popularity_{how}@{k}", PopularityBiasMetric(k=k, metric=how)) for how in ("arp", "gini", "coverage")]
    return named + [("recommendation cases", RecCasesTable())]


def _with_features(rows: pd.DataFrame, item_vectors: pd.DataFrame | None) -> pd.DataFrame:
    if item_vectors is None:
        return rows.reset_index(drop=True)
    joined = rows.merge(item_vectors, on="item_id", how="left")
    # an item unknown to this catalog (a previous run's recommendation) has no features: zeros
    return joined.fillna({c: 0.0 for c in item_vectors.columns if c != "item_id"})


def flatten(snapshot: dict[str, Any], k: int) -> dict[str, float]:
    """{"<figure>@<k>": value}: a top-K metric's value at K (the last rank it reports), a single
    value as it is; popularity bias as popularity_<arp|gini|coverage>@k."""
    out: dict[str, float] = {}
    for m in snapshot["metrics"]:
        config = m.get("config", {})
        kind = config.get("type", "").rsplit(":", 1)[-1]
        value = m.get("value")
        if kind in TOP_K:
            ranks = value["rank"]
            last = max(ranks, key=lambda i: ranks[i])   # Evidently numbers NDCG/MRR ranks 2..K+1
            figure = float(value["value"][last])
            if kind == "FBetaTopK" and math.isnan(figure):
                # Evidently divides P·R by P + R: 0 / 0 when nothing was found. F is 0 there (sklearn's
                # zero_division=0); a NaN would also make quality.json invalid strict JSON
                figure = 0.0
            out[f"{TOP_K[kind]}@{k}"] = round(figure, 6)
        elif kind in SINGLE:
            out[f"{SINGLE[kind]}@{k}"] = round(float(value), 6)
        elif kind == "PopularityBiasMetric":
            out[f"popularity_{config.get('metric', 'arp')}@{k}"] = round(float(value), 6)
    return dict(sorted(out.items()))


def add_comparison(html_path: Path, figures: dict[str, float], previous: dict[str, float] | None,
                   heading: str, not_computed: dict[str, str] | None = None) -> None:
    """Put a table of this run's figures beside the live model's at the top of the Evidently page
    (Evidently's own reference column needs the previous run's recommendations and training data),
    and the figures that could not be computed, each with its reason."""
    rows = []
    for name, value in figures.items():
        before = (previous or {}).get(name)
        change = "" if before is None else f"{value - before:+.4f}"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{value:.4f}</td>"
                    f"<td>{'' if before is None else f'{before:.4f}'}</td><td>{change}</td></tr>")
    rows += [f"<tr><td>{html.escape(name)}</td><td colspan='3'>not computed: {html.escape(why)}</td></tr>"
             for name, why in (not_computed or {}).items()]
    table = (f"<section id='towerflow-comparison' style='font:14px sans-serif;margin:16px 32px'>"
             f"<h2>{html.escape(heading)}</h2><table border='1' cellpadding='4' style='border-collapse:collapse'>"
             "<tr><th>figure</th><th>this run</th><th>live model</th><th>change</th></tr>"
             + "".join(rows) + "</table></section>")
    put_at_top(html_path, table, "the comparison")
