"""The per-row rules of the interactions contract, defined once and used three ways:

- the validate stage's GX suite builds its interactions expectations from them (validation/suites.py);
- the door (POST /events, `towerflow events push`: flows/serving/events.py) refuses a row that breaks
  one, after filling the documented defaults, so what it logs is what the contract accepts;
- ingest (flows/sources/events_log.py) quarantines logged event rows that break one (an older log, a
  rule tightened since) instead of letting validate stop the run.

A rule names its column, the problem as the suite reports it, and its severity group (`check`).
Bounds are numbers or the names of suite parameters (`now`, `floor`), whose values each caller gives:
the validate stage its clock, the door its clock plus the clock skew it tolerates.
Kept free of great_expectations imports: the service and ingest evaluate the rules with pandas.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from validation.params import EventRules, ValidateParams

FLOAT_MAX = float(np.finfo(np.float64).max)    # the bounds of a finite float64
DEFAULT_WEIGHT = 1.0                           # docs/DATA.md: an interaction without a weight weighs 1.0
NULL_PROBLEM = "null values"


def id_problem(kind: str) -> str:
    return f"ids must be {kind} (schema.json)"


@dataclass(frozen=True)
class Bound:
    """column values within [min_value, max_value] (inclusive; nulls are left to the not-null rule)."""

    column: str
    problem: str
    min_value: float | str | None = None     # a number, or the name of a suite parameter
    max_value: float | str | None = None
    check: str = "values"


def finite(column: str) -> Bound:
    """±inf passes the type and null checks but turns every mean, norm and gradient downstream into
    NaN (check "finite": not in validate.severity, so never only a warning)."""
    return Bound(column, "non-finite value (inf or -inf)", -FLOAT_MAX, FLOAT_MAX, check="finite")


TIMESTAMP_BOUNDS = (
    Bound("timestamp", "timestamp in the future (or not tz-aware UTC, or unix milliseconds written as seconds)", max_value="now"),
    Bound("timestamp", "timestamp before validate.timestamp_floor", min_value="floor"),
)


def interaction_columns(schema: dict[str, Any]) -> list[str]:
    """The interactions columns every row must fill (rating when the source has ratings)."""
    return ["user_id", "item_id", "timestamp", "weight", *(["rating"] if schema.get("has_rating") else [])]


def interaction_bounds(schema: dict[str, Any], validate_cfg: ValidateParams) -> list[Bound]:
    bounds = [*TIMESTAMP_BOUNDS, finite("weight"), Bound("weight", "negative weight", min_value=0)]
    if schema.get("has_rating"):
        bounds.append(finite("rating"))
        if validate_cfg.rating_range is not None:
            lo, hi = validate_cfg.rating_range
            bounds.append(Bound("rating", f"rating outside validate.rating_range {[lo, hi]}", lo, hi))
    return bounds


def parameters(now: datetime, validate_cfg: ValidateParams) -> dict[str, Any]:
    """Run-time values of the bounds' parameters: `now` must be tz-aware (timestamps are UTC)."""
    return {"now": now, "floor": validate_cfg.timestamp_floor}


def fill_defaults(frame: pd.DataFrame, schema: dict[str, Any], rules: EventRules) -> pd.DataFrame:
    """The documented defaults of missing values: weight 1.0; rating the source's rule (a fill value
    when it has one; an event of a source without ratings keeps none)."""
    out = frame.copy()
    weight = pd.to_numeric(out["weight"], errors="coerce") if "weight" in out else pd.Series(np.nan, out.index)
    out["weight"] = weight.fillna(DEFAULT_WEIGHT).astype(float)
    if schema.get("has_rating"):
        rating = pd.to_numeric(out["rating"], errors="coerce") if "rating" in out else pd.Series(np.nan, out.index)
        out["rating"] = rating.fillna(rules.rating_fill) if rules.rating_fill is not None else rating
        out["rating"] = out["rating"].astype(float)
    elif "rating" in out:
        out = out.drop(columns="rating")
    return out


def _value(bound: float | str | None, params: dict[str, Any]) -> Any:
    if isinstance(bound, str):
        value = params[bound]
        return pd.Timestamp(value) if isinstance(value, datetime) else value
    return bound


def row_problems(frame: pd.DataFrame, schema: dict[str, Any], validate_cfg: ValidateParams,
                 params: dict[str, Any]) -> pd.Series:
    """Per row, "<column>: <problem>" of the first rule it breaks, or None (interactions columns
    already typed: ids, UTC timestamps, floats). A missing column counts as all nulls."""
    problems = pd.Series([None] * len(frame), index=frame.index, dtype=object)

    def note(column: str, problem: str, bad: pd.Series) -> None:
        problems[bad & problems.isna()] = f"{column}: {problem}"

    for column in interaction_columns(schema):
        values = frame[column] if column in frame else pd.Series(np.nan, index=frame.index)
        note(column, NULL_PROBLEM, values.isna())
    for bound in interaction_bounds(schema, validate_cfg):
        if bound.column not in frame:
            continue
        values = frame[bound.column]
        bad = pd.Series(False, index=frame.index)
        lo, hi = _value(bound.min_value, params), _value(bound.max_value, params)
        if lo is not None:
            bad |= values.notna() & (values < lo)
        if hi is not None:
            bad |= values.notna() & (values > hi)
        note(bound.column, bound.problem, bad)
    return problems
