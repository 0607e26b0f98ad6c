"""Stage report: Evidently model quality and data drift of this run, beside the live model's.

- Quality: Evidently's recsys metrics (flows/reports/quality.py) on the two-tower's holdout
  recommendations (written by the evaluate stage), with the live bundle's figures beside them.
- Drift (flows/reports/drift.py) on interaction rows (flows/reports/frames.py): (a) the newest window
  of the training rows (report.drift.window_share of them, in time order) vs the rows before; (b) a
  sample of this run's training data vs the sample the live bundle kept of its own. Each column's
  score is judged against its natural range: what the same comparison gave for earlier windows of
  this data (flows/reports/drift_calibration.py); (b) uses the same range.

The live bundle is read when the stage runs (it is the publish stage's output, so DVC cannot list it
as a dependency without a cycle). With nothing published yet, (b) and the comparison say so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from features.memory import return_freed_memory
from flows.params import DriftLimits, ReportParams
from flows.reports.consistency import feature_agreement
from flows.reports.diversity import diversity_sample
from flows.reports.drift import brief, drift_report, skipped_report
from flows.reports.drift_calibration import Windows, add_verdict, judge, limits, natural_ranges, plan_windows
from flows.reports.frames import (
    BEHAVIOUR,
    Frame,
    TrainingData,
    bounded,
    interaction_frame,
    item_feature_vectors,
    read_parquet,
    read_training,
    utc,
)
from flows.reports.live import LiveBundle, lineage, lineage_change, live_bundle
from flows.reports.quality import add_comparison, check_recs, quality_report
from models.fork_pool import resolve_workers, run_jobs

NO_LIVE = "no previous published model"
# report.workers: auto runs a sampled quality report's two Evidently reports side by side up to this many
# training rows: each process holds its own frames (the 10M scale bench's report stage peaked at 7.5 GB in
# one process, the 1M one at 3.8 GB)
AUTO_MAX_TRAIN_ROWS = 2_000_000
# ... and the drift reports beside the quality report up to this many: then three processes hold their
# frames at once (the 700k / 14M-log shape, 568k training rows: 4.9 GB of summed RSS against 2.4 GB
# one after the other, with the two reports' 58.7 -> 44.6 s)
AUTO_MAX_BESIDE_ROWS = 1_000_000


def quality_workers(workers: int | str, train_rows: int) -> int:
    """Processes for the quality report (report.workers): auto = the usable cores, at most 2 (its two
    reports), up to AUTO_MAX_TRAIN_ROWS training rows, else 1; a count as given."""
    if workers == "auto":
        return resolve_workers("auto", 1, 2) if train_rows <= AUTO_MAX_TRAIN_ROWS else 1
    return resolve_workers(workers, 1, 2)


def drift_beside(workers: int | str, train_rows: int) -> bool:
    """Whether the drift reports run beside the quality report (report.workers): auto = 2 usable cores
    and up to AUTO_MAX_BESIDE_ROWS training rows; a count of 2 or more."""
    return quality_workers(workers, train_rows) > 1 and (workers != "auto" or train_rows <= AUTO_MAX_BESIDE_ROWS)


def report(report_cfg: ReportParams, limits: DriftLimits, seed: int, ingested: Path, training_dir: Path,
           recs_path: Path, published_dir: Path, drift_dir: Path, quality_dir: Path,
           champion_path: Path | None = None, compare_across_sources: bool = False) -> dict[str, Any]:
    """Writes quality_dir/quality.html + quality.json ({"ndcg@20": ..., "k", "users", "previous",
    "not_computed": {figure: reason} when Evidently could not compute some}) and
    drift_dir/{window,published}.html + .json (Evidently, with the verdict table on top),
    drift_dir/summary.json (per comparison: each column's score beside its natural range, floor, limit
    and verdict, the drifted columns and their share; or why it was not judged, with the row count)
    and drift_dir/reference.parquet (the sample of this run's training rows that a published bundle
    keeps). limits: the gate's drift thresholds (shares of drifted columns). champion_path: the
    evaluate stage's reports/champion.json, the live model on this run's holdout (the quality
    comparison's figures). A live model of another source (or contract) is not compared unless
    compare_across_sources.

    The drift reports and the quality report are independent: with report.workers 2 (`drift_beside`)
    they run side by side in two forked processes; otherwise the drift first, and the interaction rows
    are let go before the quality report."""
    data = read_training(ingested, training_dir)
    live = live_bundle(published_dir)
    new_lineage = None if live is None or compare_across_sources else \
        lineage_change(lineage(data.schema), live.lineage(), live.version)
    champion = json.loads(champion_path.read_text()) if champion_path is not None and champion_path.is_file() else {}
    # The quality report reads only the training pairs, the catalog and the schema. Its Diversity and
    # Serendipity each build an items x items distance matrix (a report holds about twice the matrix:
    # 0.9 GB for 7.6k items), the stage's peak: one after the other, the interaction rows are let go
    # before it, not kept under it.
    train = data.examples.loc[data.examples["split"] == "train", ["user_id", "item_id"]]
    parts = _Parts(report_cfg, limits, seed, data, live, new_lineage, drift_dir,
                   _QualityInputs(train, data.items, data.schema, recs_path,
                                  live_baseline(champion, compare_across_sources), quality_dir))
    del data
    if drift_beside(report_cfg.workers, len(train)):
        drift, quality = run_jobs([("drift reports", _drift_part), ("quality report", _quality_part)], parts,
                                  workers=2, threads=1)
    else:
        drift = _drift_part(parts)
        parts.data = None
        return_freed_memory()
        quality = _quality_part(parts)
    ndcg = f"ndcg@{report_cfg.k}"
    return {"live_version": live.version if live else None, ndcg: quality.get(ndcg),
            **{f"{name}_drift_share": d.get("drift_share") for name, d in drift.items()}}


@dataclass
class _QualityInputs:
    train: pd.DataFrame           # the training split's (user_id, item_id) rows
    items: pd.DataFrame
    schema: dict[str, Any]
    recs_path: Path
    previous: dict[str, Any]      # live_baseline's
    quality_dir: Path


@dataclass
class _Parts:
    """What the drift and quality parts read: inherited by forked workers, not pickled."""

    cfg: ReportParams
    limits: DriftLimits
    seed: int
    data: TrainingData | None
    live: LiveBundle | None
    new_lineage: str | None
    drift_dir: Path
    quality: _QualityInputs


def _drift_part(parts: _Parts) -> dict[str, dict[str, Any]]:
    """The window and published drift reports, the catalog agreement and summary.json (+ the
    reference sample a published bundle keeps)."""
    cfg, data, drift_dir = parts.cfg, parts.data, parts.drift_dir
    assert data is not None
    frame = interaction_frame(data)
    sample = bounded(frame.rows[frame.columns], cfg.drift_rows, parts.seed)
    drift_dir.mkdir(parents=True, exist_ok=True)
    sample.to_parquet(drift_dir / "reference.parquet", index=False)
    window, natural = _window_drift(cfg, parts.limits.window, parts.seed, data, frame, drift_dir)
    published = _published_drift(parts.limits.published, sample, frame, parts.live, drift_dir, parts.new_lineage)
    drift = {"window": window,
             "published": _judged_published(cfg, parts.limits.published, window, natural, frame, drift_dir,
                                            published),
             "catalog": _catalog_agreement(data, parts.live, parts.new_lineage)}
    (drift_dir / "summary.json").write_text(json.dumps(drift, indent=2) + "\n")
    return drift


def _quality_part(parts: _Parts) -> dict[str, Any]:
    q = parts.quality
    return _quality(parts.cfg, parts.seed, q.train, q.items, q.schema, q.recs_path, q.previous, q.quality_dir)


def _catalog_agreement(data: TrainingData, live: LiveBundle | None, new_lineage: str | None) -> dict[str, Any]:
    """The item features of the items both catalogs hold, this run's vs the live bundle's (what a
    distribution test cannot see: a column shuffled across rows keeps its distribution)."""
    if live is None:
        return {"skipped": NO_LIVE}
    if new_lineage is not None:
        return {"skipped": new_lineage}
    live_items, live_schema = live.frame("items.parquet"), live.json("schema.json")
    if live_items is None or live_schema is None:
        return {"skipped": f"the live bundle {live.version} keeps no catalog (items.parquet, schema.json)"}
    result = feature_agreement(live_items, data.items, live_schema.get("item_features", {}),
                               data.schema.get("item_features", {}), min_agreement=None)
    return {**result, "live_version": live.version}


def _window_drift(report_cfg: ReportParams, limit: float | None, seed: int, data: TrainingData, frame: Frame,
                  drift_dir: Path) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The newest window vs its past, judged against the earlier windows' natural range; returns the
    summary and that range (the published comparison is judged with it too)."""
    html_path, json_path = drift_dir / "window.html", drift_dir / "window.json"
    ts = utc(data.examples["timestamp"])
    windows = plan_windows(ts, report_cfg.drift)
    if not isinstance(windows, Windows):
        return {**skipped_report(f"not judged: {windows}", "Drift: newest window", html_path, json_path),
                "rows": len(ts)}, {}
    rows = frame.rows[frame.columns]
    natural, runs = natural_ranges(rows, frame.numeric, frame.categorical, windows, report_cfg.drift_rows, seed)
    bound = limits(frame.columns, frame.numeric, natural, report_cfg.drift)
    newest, past = windows.current(0), windows.past(0)
    summary = drift_report(bounded(rows.iloc[past], report_cfg.drift_rows, seed),
                           bounded(rows.iloc[newest], report_cfg.drift_rows, seed),
                           frame.numeric, frame.categorical, limit, html_path, json_path, limits=bound)
    span = ts.iloc[newest]
    pace = {**_pace(frame), **_calendar(frame, span.max() - span.min())}
    summary = judge(summary, frame.numeric, natural, report_cfg.drift, limit, pace=pace)
    summary.update(since=span.min().isoformat(), until=span.max().isoformat(), window_rows=windows.size,
                   calibration=[{k: v for k, v in r.items() if k != "scores"} for r in runs])
    add_verdict(html_path, summary, f"Drift verdict: the newest {windows.size} rows vs the {len(past)} before",
                _note(report_cfg, windows.count))
    return brief(summary), natural


def _pace(frame: Frame) -> dict[str, str]:
    """The behaviour counts (interactions in the last w days) follow the data's pace: a busy month
    raises them, a campaign's new users lower them, with nothing broken. The window check shows them
    and does not judge them; the comparison with the live model's data does, and a double-logged
    stream shows in `repeat`."""
    why = "counts calendar days, so it moves with the data's pace; judged against the live model's data"
    return {c: why for c in frame.columns if c.startswith(f"user_{BEHAVIOUR}")}


# calendar columns of the interaction frame and the cycle each one repeats over
CYCLES = {"day_of_week": ("week", pd.Timedelta(days=7)), "hour_of_day": ("day", pd.Timedelta(days=1))}


def _calendar(frame: Frame, span: pd.Timedelta) -> dict[str, str]:
    """The calendar columns a window spanning `span` cannot be judged on: under two whole cycles, its
    mix is set by which part of the cycle the span covers (a window of 12 days holds five weekdays
    twice and two once: Jensen-Shannon distance up to 0.12 from uniform behaviour, above the 0.1
    floor; from two cycles on, at most 0.071). A busy last month makes the newest window that short.
    The comparison with the live model's data, over whole training sets, still judges them."""
    days = span / pd.Timedelta(days=1)
    return {c: (f"the newest window spans {days:.1f} days, under two {unit}s: which part of the {unit} it "
                "covers sets its mix; judged against the live model's data")
            for c, (unit, cycle) in CYCLES.items() if c in frame.columns and span < 2 * cycle}


def _note(report_cfg: ReportParams, count: int) -> str:
    cfg = report_cfg.drift
    natural = (f"Natural range: the scores of the {count} earlier windows of the same size, each against its "
               f"own past. A column is drifted when its score is above the range's top by more than "
               f"{cfg.margin:.0%} and above" if count else
               "No natural range (the training data is too short for windows): a column is drifted above")
    return (f"{natural} the floor (Wasserstein distance / reference std {cfg.floor_numeric}, Jensen-Shannon "
            f"distance {cfg.floor_categorical}). This table is the verdict the gate reads.")


def _judged_published(report_cfg: ReportParams, limit: float | None, window: dict[str, Any],
                      natural: dict[str, list[float]], frame: Frame, drift_dir: Path,
                      summary: dict[str, Any]) -> dict[str, Any]:
    """The published comparison judged like the window: a whole training set moves less from one run
    to the next than its newest window does from its past, so the window's natural range bounds it."""
    if "columns" not in summary:
        return summary
    judged = judge(summary, frame.numeric, natural, report_cfg.drift, limit)
    add_verdict(drift_dir / "published.html", judged, "Drift verdict: this run vs the live model's data",
                _note(report_cfg, len(window.get("calibration", [])))
                + " Evidently's marks below use its own threshold (0.1) for each score.")
    return judged


def _published_drift(limit: float | None, sample: pd.DataFrame, frame: Frame, live: LiveBundle | None,
                     drift_dir: Path, new_lineage: str | None = None) -> dict[str, Any]:
    html_path, json_path = drift_dir / "published.html", drift_dir / "published.json"
    title = "Drift: this run vs the live model's training data"
    if new_lineage is not None:    # another source's rows differ by nature: that is not drift
        return skipped_report(new_lineage, title, html_path, json_path)
    previous = live.frame("drift_reference.parquet") if live else None
    if previous is None:
        why = NO_LIVE if live is None else f"the live bundle {live.version} has no drift_reference.parquet"
        return skipped_report(why, title, html_path, json_path)
    # a column's kind follows its dtype on both sides (the samples are written by this stage)
    numeric = [c for c in frame.numeric if c in previous and pd.api.types.is_numeric_dtype(previous[c])]
    categorical = [c for c in frame.categorical if c in previous and not pd.api.types.is_numeric_dtype(previous[c])]
    summary = drift_report(previous, sample, numeric, categorical, limit, html_path, json_path)
    only = sorted(set(previous.columns) ^ set(sample.columns))
    return {**brief(summary), "live_version": live.version, **({"columns_on_one_side": only} if only else {})}


def _quality(report_cfg: ReportParams, seed: int, train: pd.DataFrame, items: pd.DataFrame, schema: dict[str, Any],
             recs_path: Path, previous: dict[str, Any], quality_dir: Path) -> dict[str, Any]:
    """train: the training split's (user_id, item_id) rows; items: the catalog (item_id + features)."""
    k = report_cfg.k
    recs = read_parquet(recs_path, "evaluate")
    check_recs(recs, recs_path, k)
    users = pd.Series(recs["user_id"].unique())
    if len(users) > report_cfg.max_users:
        recs = recs[recs["user_id"].isin(users.sample(n=report_cfg.max_users, random_state=seed))]
    note = None
    sample = diversity_sample(recs, train, k, report_cfg.max_items_for_diversity, report_cfg.max_users_pairwise,
                              seed)
    if sample is not None:     # the vectors of the sampled items only: a catalog's would be items x features
        items = items[items["item_id"].isin(pd.concat([sample.recs["item_id"], sample.train["item_id"]]))]
        note = sample.note
    vectors = item_feature_vectors(items, schema)
    if vectors.shape[1] == 1:
        vectors, note = None, "diversity and serendipity skipped: the items have no features"
    html_path = quality_dir / "quality.html"
    workers = quality_workers(report_cfg.workers, len(train)) if sample is not None and vectors is not None else 1
    figures, not_computed = quality_report(recs, train, vectors, k, html_path, diversity=sample, workers=workers)
    add_comparison(html_path, previous.get("challenger") or figures, previous.get("metrics"),
                   f"Model quality: {previous['line']}", not_computed)
    out = {**figures, "k": k, "users": int(recs["user_id"].nunique()), "workers": workers, "previous": previous,
           **({"diversity_sample": {"users": sample.users, "items": sample.items}} if sample is not None else {}),
           **({"note": note} if note else {}), **({"not_computed": not_computed} if not_computed else {})}
    (quality_dir / "quality.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def live_baseline(champion: dict[str, Any], compare_across_sources: bool = False) -> dict[str, Any]:
    """The live model beside this run, both on this run's holdout (champion: reports/champion.json), as
    the gate compares them: {"version", "line", "challenger" (this run's figures), and "metrics" (the
    live model's) + cold counts, or "skipped": why they are not compared}."""
    version, change = champion.get("live_version"), (champion.get("lineage") or {}).get("change")
    why = None if champion.get("compared") else champion.get("reason") or NO_LIVE
    if change and not compare_across_sources:
        why = f"{change} (gate.compare_across_sources is false)"
    if why is not None:
        return {"version": version, "skipped": why, "line": f"live model not compared: {why}",
                "challenger": champion.get("challenger")}
    cold = {k: champion[k] for k in ("n_users", "n_items", "cold_users", "cold_items") if k in champion}
    line = (f"this run vs live {version}, both on this run's holdout ({cold.get('cold_users')} of "
            f"{cold.get('n_users')} users and {cold.get('cold_items')} of {cold.get('n_items')} items "
            "unknown to the live model)")
    return {"version": version, "holdout": "this run's", "metrics": champion.get("metrics", {}), **cold,
            "line": line, "challenger": champion.get("challenger"), **({"lineage_change": change} if change else {})}
