"""The drift calibration's own rules on small hand-made inputs (no Evidently page): windows follow the
rows, not the calendar; a column drifts only beyond its natural range and the effect-size floor; a
large sample alone is no drift."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from flows.params import DriftParams
from flows.reports.drift import column_scores
from flows.reports.drift_calibration import Windows, judge, plan_windows

CFG = DriftParams()


def test_windows_are_shares_of_the_rows_in_time_order():
    rng = np.random.default_rng(0)
    # ten years of history and then three events today: the newest window is still a tenth of the rows
    ts = pd.Series(pd.Timestamp("1997-01-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 3650, 9_997), unit="D"))
    ts = pd.concat([ts, pd.Series([pd.Timestamp("2026-12-02", tz="UTC")] * 3)], ignore_index=True).sample(
        frac=1, random_state=0, ignore_index=True)
    w = plan_windows(ts, CFG)
    assert isinstance(w, Windows) and (w.size, w.first, w.count) == (1_000, 2, 5)
    newest, past = ts.iloc[w.current(0)], ts.iloc[w.past(0)]
    assert len(newest) == 1_000 and len(past) == 4_000 and past.max() <= newest.min()
    assert (newest == pd.Timestamp("2026-12-02", tz="UTC")).sum() == 3
    assert list(w.earlier) == [2, 3, 4, 5, 6] and len(w.past(6)) == 3_000   # the earliest past is shorter
    # too short for the newest window, a guard window and a past: not judged, with the row count
    why = plan_windows(ts.iloc[:1_400], CFG)
    assert why == ("1400 rows: the newest window, 2 earlier and a past need 2000 "
                   "(report.drift.min_window_rows=500, window_share=0.1)")


def _summary(scores: dict[str, float]) -> dict:
    return {"drift_share": 1.0, "columns": {c: {"method": "m", "score": s, "threshold": 0.1} for c, s in scores.items()}}


def test_a_column_drifts_only_beyond_its_natural_range_and_the_floor():
    natural = {"trend": [0.3, 0.6], "calm": [0.01, 0.02], "moved": [0.01, 0.05], "counts": [0.01, 0.02],
               "cat": [0.02, 0.04]}
    scores = {"trend": 0.85, "calm": 0.15, "moved": 0.35, "counts": 0.9, "cat": 0.12, "new": 0.19}
    out = judge(_summary(scores), ["trend", "calm", "moved", "counts", "new"], natural, CFG, 0.0,
                pace={"counts": "moves with the pace"})
    verdicts = {c: v["verdict"] for c, v in out["columns"].items()}
    assert verdicts == {"trend": "within its natural range",          # 0.85 <= 0.6 x 1.5
                        "calm": "below the effect-size floor",        # far beyond 0.02, under 0.2 std
                        "moved": "drifted", "counts": "not judged: moves with the pace",
                        "cat": "drifted",                              # categorical floor 0.1
                        "new": "below the effect-size floor"}         # no natural range: the floor alone
    assert out["columns"]["trend"]["limit"] == 0.9 and out["columns"]["trend"]["natural"] == [0.3, 0.6]
    assert out["drifted_columns"] == ["moved", "cat"] and out["n_columns"] == 5
    assert out["drift_share"] == 0.4 and out["dataset_drift"] is True
    assert not judge(_summary({"calm": 0.15}), ["calm"], natural, CFG, 0.0)["dataset_drift"]


def test_a_large_sample_alone_is_no_drift():
    """200k rows a twentieth of a standard deviation apart: a statistical test calls it drift, the
    effect size (Evidently's normed Wasserstein distance) stays far under the floor."""
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"x": rng.normal(0, 1, 200_000), "c": rng.choice(["a", "b", "c"], 200_000, p=[0.5, 0.3, 0.2])})
    cur = pd.DataFrame({"x": rng.normal(0.05, 1, 200_000), "c": rng.choice(["a", "b", "c"], 200_000, p=[0.48, 0.32, 0.2])})
    assert stats.ks_2samp(ref["x"], cur["x"]).pvalue < 1e-10
    assert stats.chi2_contingency(pd.crosstab(np.r_[np.zeros(200_000), np.ones(200_000)],
                                              np.r_[ref["c"], cur["c"]]))[1] < 1e-10
    scores = column_scores(ref, cur, ["x"], ["c"])
    assert scores["x"] < CFG.floor_numeric / 3 and scores["c"] < CFG.floor_categorical / 3
    # and a constant column scores 0 instead of dividing by its zero spread
    assert column_scores(ref.assign(k=1.0), cur.assign(k=1.0), ["k"], []) == {"k": 0.0}
