"""Interaction data in the contract (docs/DATA.md) with shapes the demo does not have, and the report
and gate stages' inputs built from it without the model stages.

`make_shape` draws users, items and interactions from a small generative model: users join over
time and differ in activity (the young more active), items are released over time and users prefer
recent releases (the item year trends), some genres are far more popular than others, ratings
depend on the item and the user and drift slowly. Knobs give the shapes of issue 20: years of
history with growing volume and a busy last month, half-star ratings over a catalog 5x the demo's,
a weekly season. `stage_inputs` writes what the report and gate stages read: ingested/
(schema.json, interactions), training/ (examples with Feast's behaviour counts computed in pandas,
items), the evaluate stage's holdout recommendations (random scores: the drift checks do not
depend on the model) and metrics.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flows.sources.shapes import draw_within
from training_data import temporal_examples

GENRES = ["drama", "comedy", "action", "thriller", "romance", "scifi", "horror", "docs"]
GENRE_APPEAL = np.array([6.0, 4.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3])   # drama and comedy dominate, as in MovieLens
AGES = ["18-24", "25-34", "35-44", "45-49", "50+"]
DAY = 86_400
SCHEMA = {"user_id_dtype": "int64", "item_id_dtype": "int64",
          "user_features": {"categorical": ["age_bucket", "gender", "occupation"], "numeric": [], "multi": []},
          "item_features": {"categorical": ["genre"], "numeric": ["year"], "multi": []},
          "has_rating": True, "ranking_logs": "none"}


@dataclass(frozen=True)
class Shape:
    rows: int = 30_000
    days: int = 365
    users: int = 1_500
    items: int = 1_700
    busy_days: int = 0           # the last busy_days carry busy_factor x the volume ...
    busy_factor: float = 3.0
    busy_new_users: bool = False  # ... from users who join then (a campaign), else from everyone (a season)
    weekly: bool = False         # weekends twice as busy, in the afternoon instead of the evening
    half_stars: bool = False
    rating_trend: float = 0.0    # rating points added from the first to the last day
    start: str = "2021-01-01"


SHAPES = {
    "trend_busy_month": Shape(rows=36_000, days=3 * 365, users=2_000, busy_days=30, rating_trend=0.3),
    "half_stars_5x_catalog": Shape(rows=30_000, days=2 * 365, users=1_500, items=8_400, half_stars=True),
    "weekly_season": Shape(rows=30_000, days=180, users=1_200, weekly=True),
    # three last weeks 6x as busy: the newest tenth of the rows spans under two weeks, so its weekday mix
    # follows which days it covers (the gate once blocked this healthy shape on day_of_week)
    "very_busy_weeks": Shape(rows=30_000, days=2 * 365, users=1_500, busy_days=20, busy_factor=6.0),
}


def _days(shape: Shape, join: np.ndarray, activity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each row's day: the volume of a day is the activity of the users who joined by then, so each
    user keeps their own pace and volume grows with the user base (weekends doubled if weekly)."""
    day = np.arange(shape.days)
    volume = np.cumsum(np.bincount(join, weights=activity, minlength=shape.days))
    if shape.busy_days and not shape.busy_new_users:
        volume[-shape.busy_days:] *= shape.busy_factor
    if shape.weekly:
        volume = volume * np.where((pd.Timestamp(shape.start).dayofweek + day) % 7 >= 5, 2.0, 1.0)
    return np.sort(rng.choice(shape.days, shape.rows, p=volume / volume.sum()))


def _seconds(shape: Shape, days: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    weekend = (pd.Timestamp(shape.start).dayofweek + days) % 7 >= 5
    evening = np.clip(rng.normal(20, 2.5, len(days)), 0, 23.99)
    afternoon = np.clip(rng.normal(15, 3, len(days)), 0, 23.99)
    hours = np.where(weekend & shape.weekly, afternoon, evening)
    return days * DAY + (hours * 3600).astype(np.int64)


def make_shape(shape: Shape, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(users, items, interactions) in the contract, interactions sorted by time."""
    rng = np.random.default_rng(seed)
    # users join over the span (sorted by join day), a third of them at the start: the volume grows
    # with them; a busy last month is a campaign ((busy_factor - 1) x the users so far join at its
    # start) or a season (everyone busy_factor x as active)
    n_busy = int(shape.users * (shape.busy_factor - 1) / shape.busy_factor) if shape.busy_new_users else 0
    base = shape.users - n_busy
    join = np.where(rng.random(base) < 1 / 3, 0, rng.integers(0, shape.days - shape.busy_days, base))
    join = np.sort(np.concatenate([join, rng.integers(shape.days - shape.busy_days, shape.days - shape.busy_days + 3,
                                                      n_busy)])) if n_busy else np.sort(join)
    age = rng.choice(len(AGES), shape.users, p=[0.3, 0.3, 0.2, 0.1, 0.1])
    activity = rng.lognormal(0, 0.8, shape.users) * (1.8 - 0.3 * age)
    users = pd.DataFrame({"user_id": np.arange(1, shape.users + 1), "age_bucket": np.array(AGES)[age],
                          "gender": rng.choice(["F", "M"], shape.users),
                          "occupation": rng.choice([f"occ{i}" for i in range(12)], shape.users)})
    days = _days(shape, join, activity, rng)
    ts = _seconds(shape, days, rng)
    eligible = np.searchsorted(join, days, side="right")          # users joined by each row's day
    eligible = np.maximum(eligible, 1)
    user = draw_within(np.concatenate([[0], np.cumsum(activity)]), np.zeros(len(days), int), eligible, rng)

    # items released from two years before the start on (sorted by release); half the picks are
    # among the releases of the last 180 days: the item year follows time
    release = np.sort(rng.integers(-2 * 365, shape.days, shape.items))
    genre = rng.choice(len(GENRES), shape.items)
    appeal = rng.pareto(1.5, shape.items) * GENRE_APPEAL[genre] + 0.01
    quality = rng.normal(0, 0.6, shape.items)
    items = pd.DataFrame({"item_id": np.arange(10_001, 10_001 + shape.items), "genre": np.array(GENRES)[genre],
                          "year": (pd.Timestamp(shape.start).year + release / 365).astype(np.float64).round(2)})
    cum = np.concatenate([[0], np.cumsum(appeal)])
    hi = np.maximum(np.searchsorted(release, days, side="right"), 1)
    recent = np.minimum(np.searchsorted(release, days - 180, side="left"), hi - 1)
    lo = np.where(rng.random(len(days)) < 0.5, recent, 0)
    item = draw_within(cum, lo, hi, rng)

    bias = rng.normal(0, 0.5, shape.users)
    raw = 3.4 + quality[item] + bias[user] + rng.normal(0, 0.8, len(days)) + shape.rating_trend * days / shape.days
    step = 0.5 if shape.half_stars else 1.0
    rating = np.clip(np.round(raw / step) * step, step if shape.half_stars else 1.0, 5.0)
    inter = pd.DataFrame({"user_id": users["user_id"].to_numpy()[user], "item_id": items["item_id"].to_numpy()[item],
                          "timestamp": pd.Timestamp(shape.start, tz="UTC") + pd.to_timedelta(ts, unit="s"),
                          "rating": rating})
    inter = inter.drop_duplicates(["user_id", "item_id"], keep="first")   # one rating per user and item
    return users, items, inter.sort_values("timestamp", kind="stable").reset_index(drop=True)


def behaviour_counts(examples: pd.DataFrame, windows: tuple[int, ...] = (1, 7, 30)) -> pd.DataFrame:
    """interactions_total and interactions_<w>d per example: the user's interactions strictly before
    the row's time, and those in [t - w days, t) (features/history.py's definitions, in pandas)."""
    out = examples.copy()
    ns = pd.to_datetime(out["timestamp"], utc=True).astype("int64").to_numpy()
    cols = {"interactions_total": np.zeros(len(out), np.int64),
            **{f"interactions_{w}d": np.zeros(len(out), np.int64) for w in windows}}
    for idx in out.groupby("user_id").indices.values():
        t = np.sort(ns[idx])
        before = np.searchsorted(t, ns[idx], side="left")
        cols["interactions_total"][idx] = before
        for w in windows:
            cols[f"interactions_{w}d"][idx] = before - np.searchsorted(t, ns[idx] - w * DAY * 10**9, side="left")
    return out.assign(**cols)


def holdout_recs(examples: pd.DataFrame, k: int = 20, max_users: int = 300, seed: int = 0) -> pd.DataFrame:
    """The evaluate stage's recs.parquet shape: per test user k ranked items (random scores) and the
    held-out items outside them (target 1, scored below the k-th)."""
    rng = np.random.default_rng(seed)
    test = examples[examples["split"] == "test"]
    users = test["user_id"].drop_duplicates().to_numpy()[:max_users]
    catalog = examples["item_id"].unique()
    parts = []
    for u in users:
        held = set(test.loc[test["user_id"] == u, "item_id"])
        top = rng.choice(catalog, k, replace=False)
        scores = np.sort(rng.random(k))[::-1] + 1
        missed = sorted(held - set(top))
        parts.append(pd.DataFrame({
            "user_id": u, "item_id": np.concatenate([top, missed]),
            "rank": pd.array(list(range(1, k + 1)) + [None] * len(missed), dtype="Int64"),
            "score": np.concatenate([scores, rng.random(len(missed))]),
            "target": [int(i in held) for i in top] + [1] * len(missed)}))
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class StageInputs:
    ingested: Path
    training: Path
    recs: Path
    reports: Path


def stage_inputs(root: Path, users: pd.DataFrame, items: pd.DataFrame, inter: pd.DataFrame,
                 schema: dict | None = None, ndcg: float = 0.2) -> StageInputs:
    """root/{ingested,training,reports} as the stages before report leave them."""
    ingested, training, reports = root / "ingested", root / "training", root / "reports"
    for d in (ingested, training, reports / "quality"):
        d.mkdir(parents=True, exist_ok=True)
    (ingested / "schema.json").write_text(json.dumps(schema or SCHEMA))
    inter.to_parquet(ingested / "interactions.parquet", index=False)
    with_weight = inter.drop(columns=[c for c in ("rating",) if c in inter.columns])
    examples = behaviour_counts(temporal_examples(users, with_weight, history_length=5))
    examples.to_parquet(training / "examples.parquet", index=False)
    items.to_parquet(training / "items.parquet", index=False)
    holdout_recs(examples).to_parquet(reports / "quality" / "recs.parquet", index=False)
    (reports / "metrics.json").write_text(json.dumps({"two_tower": {"ndcg@20": ndcg, "recall@20": 0.2}}))
    # what evaluate writes when it has no live model to score (the drift tests judge drift alone)
    (reports / "champion.json").write_text(json.dumps({"compared": False, "live_version": None,
                                                       "reason": "no live model scored in these tests",
                                                       "challenger": {"ndcg@20": ndcg}}))
    return StageInputs(ingested, training, reports / "quality" / "recs.parquet", reports)
