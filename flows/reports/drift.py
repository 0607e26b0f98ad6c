"""Evidently DataDriftPreset between two interaction frames (flows/reports/frames.py), saved as HTML +
JSON, and the figures the gate reads: the share of drifted columns and which ones drifted."""
from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

from flows.errors import DataContractError
from flows.reports.frames import informative

# Evidently's own "dataset drift" marker in the HTML when the gate does not check this comparison.
DEFAULT_SHARE = 0.5


def drift_report(ref: pd.DataFrame, cur: pd.DataFrame, numeric: list[str], categorical: list[str],
                 threshold: float | None, html_path: Path, json_path: Path) -> dict[str, Any]:
    """Compare cur against ref on the columns that vary; write html_path (the Evidently page) and
    json_path (its snapshot); return the summary (see `summarize`)."""
    num, cat = informative(ref, cur, numeric), informative(ref, cur, categorical)
    if not num + cat:
        raise DataContractError("no column varies in either period, nothing to compare for drift")
    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    report = Report([DataDriftPreset(drift_share=threshold or DEFAULT_SHARE)], include_tests=True)
    with warnings.catch_warnings():
        # Evidently correlates columns for its plots; a column that is constant within one period
        # (legitimately: that is drift) makes numpy warn about 0/0 there.
        warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
        snapshot = report.run(Dataset.from_pandas(cur[num + cat], data_definition=definition),
                              Dataset.from_pandas(ref[num + cat], data_definition=definition))
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


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without the per-column details (those stay in the Evidently JSON)."""
    return {k: v for k, v in summary.items() if k != "columns"}
