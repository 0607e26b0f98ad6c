"""Drift judged against the data's own natural drift.

Evidently scores each column (flows/reports/drift.py); this module decides which scores are drift.
The training rows, in time order, are cut into windows of the same number of rows (a share of the
data, so they follow its own span and pace, not the calendar): the newest window is compared with
its past (the `past_windows` windows just before it), and so is each of the `windows` earlier ones.
A past of the same length for every window keeps the comparisons alike under a steady trend (a
window against all of its history would drift further from an ever longer past). The
`guard_windows` just before the newest are left out of the range: a fault that began a little before
the newest window (a replayed batch bigger than a window) would otherwise widen the range meant to
catch it. The earlier windows' scores are
a column's natural range: how much it moves from one stretch of this data to the next when nothing
is broken (a trend, a season, a growing catalog). A column counts as drifted only when its score is
above that range's top by more than `margin` AND above an effect-size floor (so neither ordinary
movement nor a large sample makes a column drift). Data too short for three windows is not judged.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.params import DriftParams
from flows.reports.drift import column_scores, put_at_top
from flows.reports.frames import bounded


@dataclass(frozen=True)
class Windows:
    """Row positions of each window in time order: 0 is the newest, 1.. the earlier ones."""

    order: np.ndarray        # row positions sorted by time
    size: int                # rows per window
    first: int               # the first earlier window of the calibration (guard_windows + 1)
    count: int               # earlier windows in the calibration (each with a past of >= 1 window)
    past_windows: int        # a window's past: the rows of this many windows just before it

    @property
    def earlier(self) -> range:
        return range(self.first, self.first + self.count)

    def current(self, j: int) -> np.ndarray:
        end = len(self.order) - j * self.size
        return self.order[end - self.size:end]

    def past(self, j: int) -> np.ndarray:
        end = len(self.order) - (j + 1) * self.size
        return self.order[max(0, end - self.past_windows * self.size):end]


def plan_windows(ts: pd.Series, cfg: DriftParams) -> Windows | str:
    """The windows of these timestamps, or why the data is too short to judge."""
    n = len(ts)
    size = max(int(np.ceil(cfg.window_share * n)), cfg.min_window_rows)
    first = cfg.guard_windows + 1
    count = min(cfg.windows, n // size - first - 1)   # window j needs a past of >= 1 window before it
    if count < 1:
        return (f"{n} rows: the newest window, {first} earlier and a past need {(first + 2) * size} "
                f"(report.drift.min_window_rows={cfg.min_window_rows}, window_share={cfg.window_share})")
    return Windows(np.argsort(ts.to_numpy(), kind="stable"), size, first, count, cfg.past_windows)


def natural_ranges(rows: pd.DataFrame, numeric: list[str], categorical: list[str], windows: Windows,
                   max_rows: int, seed: int) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """Each earlier window against its own past, with the same sample sizes as the newest window's
    comparison: {column: [lowest, highest score]} and, per window, its row counts and scores."""
    runs = []
    for j in windows.earlier:
        past = bounded(rows.iloc[windows.past(j)], max_rows, seed)
        cur = bounded(rows.iloc[windows.current(j)], max_rows, seed)
        runs.append({"window": j, "rows": len(windows.current(j)), "past_rows": len(windows.past(j)),
                     "scores": column_scores(past, cur, numeric, categorical)})
    columns = dict.fromkeys(c for r in runs for c in r["scores"])
    natural = {c: [min(r["scores"].get(c, 0.0) for r in runs), max(r["scores"].get(c, 0.0) for r in runs)]
               for c in columns}
    return natural, runs


def floor_of(column: str, numeric: list[str], cfg: DriftParams) -> float:
    return cfg.floor_numeric if column in numeric else cfg.floor_categorical


def limits(columns: list[str], numeric: list[str], natural: dict[str, list[float]], cfg: DriftParams) -> dict[str, float]:
    """The score above which each column counts as drifted: past its natural top by the margin, and
    past the floor. A column without a natural range (too little data) has the floor alone."""
    return {c: round(max(floor_of(c, numeric, cfg), natural[c][1] * (1 + cfg.margin) if c in natural else 0.0), 6)
            for c in columns}


def judge(summary: dict[str, Any], numeric: list[str], natural: dict[str, list[float]], cfg: DriftParams,
          threshold: float | None, pace: dict[str, str] | None = None) -> dict[str, Any]:
    """The drift summary (drift.summarize) with the calibrated verdict: per column its score beside its
    natural range, floor and limit; the drifted columns and their share; dataset_drift when that share
    is above threshold (the gate's; None: not checked). pace: columns shown but not judged, and why."""
    columns = summary["columns"]
    bound = limits(list(columns), numeric, natural, cfg)
    for name, col in columns.items():
        floor = floor_of(name, numeric, cfg)
        col.update(natural=natural.get(name), floor=floor, limit=bound[name],
                   drifted=name not in (pace or {}) and col["score"] > bound[name])
        col["verdict"] = (f"not judged: {(pace or {})[name]}" if name in (pace or {}) else "drifted" if col["drifted"]
                          else "below the effect-size floor" if col["score"] <= floor else "within its natural range")
        col.pop("threshold", None)   # Evidently's: the limit above is the one that decides
    drifted = sorted((c for c, v in columns.items() if v["drifted"]),
                     key=lambda c: -columns[c]["score"] / max(columns[c]["limit"], 1e-12))
    judged = len(columns) - len(set(pace or {}) & set(columns))
    share = round(len(drifted) / judged, 6) if judged else 0.0
    return {**summary, "drift_share": share, "n_columns": judged, "n_drifted": len(drifted),
            "drifted_columns": drifted, "threshold": threshold,
            "dataset_drift": threshold is not None and share > threshold, "columns": columns}


def verdict_table(summary: dict[str, Any], note: str) -> str:
    """An HTML table: per column its score, natural range, floor, limit and verdict."""
    rows = []
    for name, c in sorted(summary["columns"].items(), key=lambda kv: (not kv[1]["drifted"], kv[0])):
        nat = c.get("natural")
        span = f"{nat[0]:.4f} – {nat[1]:.4f}" if nat else "—"
        colour = "#b91c1c" if c["drifted"] else "inherit"
        rows.append(f"<tr style='color:{colour}'><td>{html.escape(name)}</td><td>{c['score']:.4f}</td>"
                    f"<td>{span}</td><td>{c['floor']:.4f}</td><td>{c['limit']:.4f}</td>"
                    f"<td>{html.escape(c['verdict'])}</td></tr>")
    return (f"<p>{html.escape(note)}</p><table border='1' cellpadding='4' style='border-collapse:collapse'>"
            "<tr><th>column</th><th>score</th><th>natural range</th><th>floor</th><th>limit</th><th>verdict</th></tr>"
            + "".join(rows) + "</table>")


def add_verdict(html_path: Path, summary: dict[str, Any], heading: str, note: str) -> None:
    """Put the verdict table at the top of Evidently's page (its own marks use its thresholds)."""
    section = (f"<section id='towerflow-drift' style='font:14px sans-serif;margin:16px 32px'>"
               f"<h2>{html.escape(heading)}</h2>{verdict_table(summary, note)}</section>")
    put_at_top(html_path, section, "the drift verdict")
