"""Synthetic datasets in the data contract (docs/DATA.md) with shapes the demo does not have.

The defaults (drift windows, thresholds, bins) are tuned nowhere but must hold on real data of other
shapes; these generators make such data with learnable structure, so that a healthy run has a model
worth publishing and a broken variant (flows/experiments/gate_shapes.py) has something to break:

- `trend`: three years of history whose activity grows, a catalog that grows (items are released
  over time), taste that slowly moves, and a busy last month; string ids;
- `halfstar`: half-star ratings (0.5 .. 5.0) and a catalog 5x the demo's (8,400 items) described only
  by numeric features;
- `weekly`: six months with a strong weekly pattern (weekends three times as busy).

Every shape is generated once over its whole span and cut at `cutoff`, so that the data of a later
run extends the data of an earlier one exactly as a real export grows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ["action", "comedy", "drama", "horror", "romance", "scifi", "docs", "kids", "crime", "music"]
DAY = 86400


@dataclass(frozen=True)
class Shape:
    name: str
    days: int                        # the whole span
    interactions: int                # over the whole span
    users: int
    items: int
    trend: float = 0.0               # activity at the end / at the start, minus 1
    busy_last_days: int = 0          # the last days of the span are `busy_factor` times as busy
    busy_factor: float = 1.0
    weekly: float = 1.0              # weekend days are this many times as busy as weekdays
    half_stars: bool = False
    numeric_items: bool = False      # items described only by numeric features
    string_ids: bool = False
    releases: bool = False           # items appear over the span (a growing catalog)
    taste_drift: float = 0.0         # how far user tastes move over the span (0: not at all)


SHAPES = {
    "trend": Shape("trend", days=3 * 365, interactions=60_000, users=1_500, items=2_000, trend=3.0,
                   busy_last_days=30, busy_factor=3.0, string_ids=True, releases=True, taste_drift=0.5),
    "halfstar": Shape("halfstar", days=400, interactions=60_000, users=1_500, items=8_400, half_stars=True,
                      numeric_items=True),
    "weekly": Shape("weekly", days=182, interactions=50_000, users=1_200, items=1_500, weekly=3.0),
}


def _times(shape: Shape, rng: np.random.Generator, start: pd.Timestamp) -> np.ndarray:
    """Event times (unix s) drawn from a daily intensity: trend x weekly pattern x busy end."""
    day = np.arange(shape.days)
    rate = 1.0 + shape.trend * day / max(shape.days - 1, 1)
    weekday = (start + pd.to_timedelta(day, unit="D")).dayofweek.to_numpy()
    rate = rate * np.where(weekday >= 5, shape.weekly, 1.0)
    if shape.busy_last_days:
        rate = rate * np.where(day >= shape.days - shape.busy_last_days, shape.busy_factor, 1.0)
    days = rng.choice(shape.days, size=shape.interactions, p=rate / rate.sum())
    seconds = rng.integers(0, DAY, shape.interactions)
    return np.sort(start.value // 10**9 + days * DAY + seconds)


def _items(shape: Shape, rng: np.random.Generator, factors: np.ndarray, released: np.ndarray,
           item_id: list) -> pd.DataFrame:
    if shape.numeric_items:
        # numeric features carry the item's latent position, so a model can generalize from them
        return pd.DataFrame({"item_id": item_id,
                             "price": np.round(np.exp(1.5 + factors[:, 0] + rng.normal(0, .3, len(item_id))), 2),
                             "duration": np.round(90 + 20 * factors[:, 1] + rng.normal(0, 5, len(item_id)), 1),
                             "score": np.round(factors[:, 2] + rng.normal(0, .2, len(item_id)), 3)})
    genre = np.argsort(-factors[:, :len(GENRES)] - rng.gumbel(size=(len(item_id), len(GENRES))) * .3, axis=1)
    return pd.DataFrame({"item_id": item_id,
                         "genres": [[GENRES[g] for g in row[:1 + i % 2]] for i, row in enumerate(genre)],
                         "year": (2000 + released // 365).astype("int64"),
                         "title": [f"Item {i}" for i in range(len(item_id))]})


def generate(shape: Shape, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """users, items, interactions over the whole span (timestamps tz-aware UTC)."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2021-01-04", tz="UTC")
    k = max(len(GENRES), 8)
    user_f = rng.normal(size=(shape.users, k))
    user_move = rng.normal(size=(shape.users, k))
    item_f = rng.normal(size=(shape.items, k))
    pop = np.log(rng.zipf(1.5, shape.items).clip(1, 1000).astype(float))
    released = (np.sort(rng.uniform(0, shape.days * 0.9, shape.items)) if shape.releases
                else np.zeros(shape.items))
    released[: shape.items // 3] = 0.0     # a back catalog that is there from the start
    activity = rng.pareto(1.2, shape.users) + 1.0
    times = _times(shape, rng, start)
    user = rng.choice(shape.users, size=len(times), p=activity / activity.sum())
    item = np.empty(len(times), dtype=np.int64)
    rating = np.empty(len(times))
    day_of = (times - start.value // 10**9) // DAY
    for chunk in np.array_split(np.arange(len(times)), 40):          # tastes and catalog per period
        t = day_of[chunk[0]] / shape.days
        taste = user_f[user[chunk]] + shape.taste_drift * t * user_move[user[chunk]]   # (n, k)
        logits = taste @ item_f.T / np.sqrt(k) * 2.0 + pop                            # (n, items)
        logits[:, released > day_of[chunk[-1]]] = -np.inf
        gumbel = rng.gumbel(size=logits.shape)
        item[chunk] = np.argmax(logits + gumbel, axis=1)
        rating[chunk] = logits[np.arange(len(chunk)), item[chunk]] - pop[item[chunk]]   # affinity
    # ratings follow affinity (z-scored over all events) around a typical 3.6-star mean
    rating = 3.6 + 0.9 * (rating - rating.mean()) / rating.std() + rng.normal(0, .5, len(rating))
    step = 0.5 if shape.half_stars else 1.0
    rating = np.clip(np.round(rating / step) * step, step if shape.half_stars else 1.0, 5.0)
    uid = [f"u{i:05d}" for i in range(shape.users)] if shape.string_ids else list(range(1, shape.users + 1))
    iid = [f"i{i:05d}" for i in range(shape.items)] if shape.string_ids else list(range(1, shape.items + 1))
    users = pd.DataFrame({"user_id": uid,
                          "age": np.round(rng.normal(35, 10, shape.users).clip(14, 80)),
                          "country": rng.choice(["de", "fr", "us", "br", "jp", "in"], shape.users)})
    items = _items(shape, rng, item_f, released, iid)
    inter = pd.DataFrame({"user_id": np.asarray(uid, dtype=object)[user],
                          "item_id": np.asarray(iid, dtype=object)[item],
                          "timestamp": pd.to_datetime(times, unit="s", utc=True), "rating": rating})
    if not shape.string_ids:
        inter = inter.astype({"user_id": "int64", "item_id": "int64"})
    return users, items, inter


def cut(users: pd.DataFrame, items: pd.DataFrame, inter: pd.DataFrame, cutoff: pd.Timestamp,
        out_dir: Path) -> Path:
    """Write the contract files of everything up to cutoff into out_dir (users and items that have
    appeared by then)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = inter[inter["timestamp"] <= cutoff]
    users[users["user_id"].isin(kept["user_id"])].to_parquet(out_dir / "users.parquet", index=False)
    items[items["item_id"].isin(kept["item_id"])].to_parquet(out_dir / "items.parquet", index=False)
    kept.to_parquet(out_dir / "interactions.parquet", index=False)
    return out_dir


def end_of(inter: pd.DataFrame) -> pd.Timestamp:
    return inter["timestamp"].max()
