"""Evidently DataDriftPreset between two interaction frames (flows/reports/frames.py), saved as HTML +
JSON, and each column's drift score. Scores are effect sizes, not p-values (a p-value of 100k rows
calls any difference drift): Wasserstein distance in reference standard deviations for numeric
columns, Jensen-Shannon distance for categorical ones. Whether a score is drift is decided by
flows/reports/drift_calibration.py against the data's own natural drift."""
from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.legacy.calculations.stattests import get_stattest
from evidently.legacy.core import ColumnType
from evidently.presets import DataDriftPreset

from flows.errors import DataContractError
from flows.reports.frames import informative

# Evidently's own "dataset drift" marker in the HTML when the gate does not check this comparison.
DEFAULT_SHARE = 0.5
# Evidently stattest per column kind: both scores are distances that grow with the size of the change
# and not with the number of rows (Evidently's default threshold for each is 0.1).
NUMERIC_METHOD, CATEGORICAL_METHOD = "wasserstein", "jensenshannon"


def _preset(threshold: float | None, limits: dict[str, float] | None) -> DataDriftPreset:
    # Evidently marks dataset drift at share >= drift_share; the gate blocks at share > threshold,
    # so a threshold of 0 (any drifted column) becomes the smallest positive share.
    share = DEFAULT_SHARE if threshold is None else max(threshold, 1e-9)
    return DataDriftPreset(drift_share=share, num_method=NUMERIC_METHOD, cat_method=CATEGORICAL_METHOD,
                           per_column_threshold=limits or None)


def _run(ref: pd.DataFrame, cur: pd.DataFrame, num: list[str], cat: list[str], preset: DataDriftPreset,
         include_tests: bool) -> Any:
    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    with warnings.catch_warnings():
        # Evidently correlates columns for its plots; a column that is constant within one period
        # (legitimately: that is drift) makes numpy warn about 0/0 there.
        warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
        return Report([preset], include_tests=include_tests).run(
            Dataset.from_pandas(cur[num + cat], data_definition=definition),
            Dataset.from_pandas(ref[num + cat], data_definition=definition))


def column_scores(ref: pd.DataFrame, cur: pd.DataFrame, numeric: list[str], categorical: list[str]) -> dict[str, float]:
    """Each column's drift score of cur against ref, from the stattest the report's ValueDrift runs
    (same method, same cleaning of infinities and nulls) without building the report's plots (which
    cost ~0.3 s a column: the calibration runs this for several windows). A column that does not
    vary on either side, or is empty on one, scores 0 (nothing to compare)."""
    scores: dict[str, float] = {}
    for names, kind, method in ((numeric, ColumnType.Numerical, NUMERIC_METHOD),
                                (categorical, ColumnType.Categorical, CATEGORICAL_METHOD)):
        varying = set(informative(ref, cur, names))
        for c in (c for c in names if c in ref.columns and c in cur.columns):
            r, k = (s.replace([-np.inf, np.inf], np.nan).dropna() for s in (ref[c], cur[c]))
            if c not in varying or r.empty or k.empty:
                scores[c] = 0.0
                continue
            test = get_stattest(r, k, kind, method)
            scores[c] = float(test(r, k, kind, None).drift_score)
    return scores


def drift_report(ref: pd.DataFrame, cur: pd.DataFrame, numeric: list[str], categorical: list[str],
                 threshold: float | None, html_path: Path, json_path: Path,
                 limits: dict[str, float] | None = None) -> dict[str, Any]:
    """Compare cur against ref on the columns that vary; write html_path (the Evidently page) and
    json_path (its snapshot); return the summary (see `summarize`). limits: each column's score limit,
    so that Evidently's marks in the page are the calibrated verdict (default: its own 0.1)."""
    num, cat = informative(ref, cur, numeric), informative(ref, cur, categorical)
    if not num + cat:
        raise DataContractError("no column varies in either period, nothing to compare for drift")
    limits = {c: v for c, v in (limits or {}).items() if c in num + cat}
    snapshot = _run(ref, cur, num, cat, _preset(threshold, limits), include_tests=True)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(html_path))
    snapshot.save_json(str(json_path))
    summary = summarize(snapshot.dict(), threshold)
    summary.update(reference_rows=len(ref), current_rows=len(cur))
    left_out = sorted(set(numeric + categorical) - set(num + cat))
    if left_out:
        summary["constant_or_one_sided"] = left_out
    return summary


def summarize(snapshot: dict[str, Any], threshold: float | None) -> dict[str, Any]:
    """Drift share from DriftedColumnsCount; per column, Evidently's own verdict (its 'drift' test
    FAILs when drift is detected, whichever direction the method's score runs)."""
    share = None
    columns: dict[str, dict[str, Any]] = {}
    for m in snapshot["metrics"]:
        config = m.get("config", {})
        if config.get("type", "").endswith("DriftedColumnsCount"):
            share = float(m["value"]["share"])
        elif config.get("type", "").endswith("ValueDrift"):
            columns[config["column"]] = {"method": config.get("method"), "threshold": config.get("threshold"),
                                         "score": float(m["value"]), "drifted": False}
    for t in snapshot.get("tests", []):
        params = t.get("metric_config", {}).get("params", {})
        if params.get("type", "").endswith("ValueDrift") and params.get("column") in columns:
            columns[params["column"]]["drifted"] = t.get("status") == "FAIL"
    if share is None:
        raise DataContractError("Evidently's report has no DriftedColumnsCount metric")
    drifted = sorted(c for c, v in columns.items() if v["drifted"])
    return {
        "drift_share": share,
        "n_columns": len(columns),
        "n_drifted": len(drifted),
        "drifted_columns": drifted,
        "threshold": threshold,
        # the gate's rule: more than the threshold's share of columns drifted (None: not checked)
        "dataset_drift": threshold is not None and share > threshold,
        "columns": columns,
    }


def skipped_report(why: str, title: str, html_path: Path, json_path: Path) -> dict[str, Any]:
    """A page and a JSON that say why this comparison did not run (DVC expects every declared file;
    a reviewer opening it learns why it is empty)."""
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"</head><body><h1>{html.escape(title)}</h1><p>Not compared: {html.escape(why)}.</p>"
                         "</body></html>\n")
    json_path.write_text(json.dumps({"skipped": why}, indent=2) + "\n")
    return {"skipped": why}


def put_at_top(html_path: Path, section: str, what: str) -> None:
    """Insert `section` right after the <body> of an Evidently page (its own layout follows)."""
    page = html_path.read_text()
    at = page.find("<body>")
    if at < 0:
        raise RuntimeError(f"{html_path}: Evidently's page has no <body> to put {what} in")
    at += len("<body>")
    html_path.write_text(page[:at] + section + page[at:])


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as summary.json keeps it: with the per-column scores, which the calibration
    (flows/reports/drift_calibration.py) judges and the portal shows beside their natural range."""
    return dict(summary)
