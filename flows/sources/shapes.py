"""Synthetic datasets in the data contract (docs/DATA.md) with shapes the demo does not have.

The defaults (drift windows, thresholds, bins) are tuned nowhere but must hold on real data of other
shapes; these generators make such data with learnable structure, so that a healthy run has a model
worth publishing and a broken variant (flows/experiments/gate_shapes.py) has something to break:

- `trend`: three years of history whose activity grows, a catalog that grows (items are released
  over time), taste that slowly moves, and a busy last month; string ids;
- `halfstar`: half-star ratings (0.5 .. 5.0) and a catalog 5x the demo's (8,400 items) described only
  by numeric features;
- `weekly`: six months with a strong weekly pattern (weekends three times as busy);
- `scaled(n)` (the scale bench, flows/experiments/scale_bench.py): n interactions with the skew of real
  logs at any size: Zipf item popularity, heavy-tailed (Pareto) user activity, multi-valued item
  features, string ids and ranking logs. Its users pick a topic, then an item of that topic by
  popularity: linear in n (the latent-factor draw of the other shapes scores every item per event).

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
    topics: int = 0                  # > 0: users pick a topic, then an item in it (linear in n; `scaled`)
    zipf: float = 0.8                # topics > 0: item popularity ∝ 1 / rank^zipf
    log_requests: float = 0.0        # ranking-log requests per interaction (0: no ranking_logs file)
    log_retrieved: int = 50          # items retrieved per logged request (10 of them shown)


SHAPES = {
    "trend": Shape("trend", days=3 * 365, interactions=60_000, users=1_500, items=2_000, trend=3.0,
                   busy_last_days=30, busy_factor=3.0, string_ids=True, releases=True, taste_drift=0.5),
    "halfstar": Shape("halfstar", days=400, interactions=60_000, users=1_500, items=8_400, half_stars=True,
                      numeric_items=True),
    "weekly": Shape("weekly", days=182, interactions=50_000, users=1_200, items=1_500, weekly=3.0),
}


def scaled(n: int, users: int | None = None, items: int | None = None, log_requests: float = 0.02) -> Shape:
    """n interactions over a year; users n/10 and items n/50 unless given (10M: 1M users, 200k items);
    log_requests logged ranking requests per interaction, each 50 rows (0.02: a log row per interaction;
    the demo's simulator logs about 20, which 0.4 matches)."""
    users = users or max(n // 10, 20)
    items = items or max(n // 50, 20)
    if n < users or n < items:
        raise ValueError(f"{n} interactions cannot cover {users} users and {items} items: give fewer of them")
    if not 0 <= log_requests <= 1:
        raise ValueError(f"log requests per interaction must be within [0, 1], got {log_requests}")
    return Shape(f"scaled_{n}", days=365, interactions=n, users=users, items=items, weekly=1.5,
                 string_ids=True, topics=max(min(items // 50, 200), 2), log_requests=log_requests)


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
    if shape.topics:
        users, items, inter, _ = generate_topics(shape, seed)
        return users, items, inter
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


def _topic_items(shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each item's topic and popularity weight: ranks 1..items shuffled over the catalog, weight
    1 / rank^zipf (a few items take most of the events, as in every catalog with a long tail)."""
    topic = np.sort(rng.integers(0, shape.topics, shape.items))        # items grouped by topic
    weight = 1.0 / rng.permutation(np.arange(1, shape.items + 1)) ** shape.zipf
    return topic, weight


def draw_within(cum: np.ndarray, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row, an index in [lo, hi) drawn with the weights whose cumulative sums are cum (cum[0] = 0)."""
    u = cum[lo] + rng.random(len(lo)) * (cum[hi] - cum[lo])
    return np.clip(np.searchsorted(cum, u, side="right") - 1, lo, hi - 1)


def _topic_features(shape: Shape, rng: np.random.Generator, topic: np.ndarray, weight: np.ndarray,
                    iid: np.ndarray) -> pd.DataFrame:
    """genres (multi: the topic's genre and 0-2 more), brand (categorical), price and year (numeric)."""
    n = shape.items
    extra = rng.integers(0, len(GENRES), (n, 2))
    n_extra = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    names = np.asarray(GENRES, dtype=object)
    genres = [[names[t % len(GENRES)], *dict.fromkeys(names[e[:m]])] for t, e, m in zip(topic, extra, n_extra)]
    genres = [list(dict.fromkeys(g)) for g in genres]
    return pd.DataFrame({"item_id": iid, "genres": genres,
                         "brand": np.char.add("b", (topic * 7 + rng.integers(0, 7, n)).astype(str)).astype(object),
                         "price": np.round(np.exp(2.0 + 0.2 * (topic % 5) + rng.normal(0, .5, n)), 2),
                         "year": (2000 + rng.integers(0, 24, n)).astype("int64"),
                         "title": np.char.add("Item ", np.arange(n).astype(str)).astype(object)})


def generate_topics(shape: Shape, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame,
                                                           pd.DataFrame | None]:
    """users, items, interactions and ranking logs (None when shape.log_requests is 0) of a topic
    shape, in time order. Each user likes a few topics (Dirichlet); an event picks one of them (or,
    one time in five, any item by popularity) and an item of it by popularity. Memory and time are
    linear in interactions + users + items."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2021-01-04", tz="UTC")
    topic, weight = _topic_items(shape, rng)
    bounds = np.searchsorted(topic, np.arange(shape.topics + 1))          # topic t: items bounds[t]..bounds[t+1]
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    liked = rng.integers(0, shape.topics, (shape.users, 3))               # each user's three topics ...
    share = rng.dirichlet([1.0, 0.5, 0.25], shape.users).cumsum(axis=1)   # ... and how much they like each
    # heavy-tailed events per user (Pareto), the busiest at 100x the mean: one account should not be
    # a fifth of the data, as uncapped Pareto draws make it at 10k users
    activity = np.minimum(rng.pareto(1.5, shape.users) + 1.0, 300.0)
    times = _times(shape, rng, start)
    n = len(times)
    user = rng.choice(shape.users, size=n, p=activity / activity.sum())
    user[rng.choice(n, shape.users, replace=False)] = np.arange(shape.users)   # every user has an event
    pick = (rng.random(n)[:, None] > share[user]).sum(axis=1).clip(0, 2)
    t = liked[user, pick]
    anywhere = rng.random(n) < 0.2
    lo = np.where(anywhere, 0, bounds[t])
    hi = np.where(anywhere, shape.items, bounds[t + 1])
    empty = hi <= lo                                                      # a topic no item drew
    lo[empty], hi[empty] = 0, shape.items
    item = draw_within(cum, lo, hi, rng)
    item[rng.choice(n, shape.items, replace=False)] = np.arange(shape.items)   # and every item
    uid = np.char.add("u", np.char.zfill(np.arange(shape.users).astype(str), 7)).astype(object)
    iid = np.char.add("i", np.char.zfill(np.arange(shape.items).astype(str), 6)).astype(object)
    # an item of the topic the user came for is rated higher (a popular pick from anywhere, lower)
    rating = np.clip(np.round(3.2 + 0.8 * (topic[item] == t) + rng.normal(0, .9, n)), 1.0, 5.0)
    users = pd.DataFrame({"user_id": uid, "age": np.round(rng.normal(35, 10, shape.users).clip(14, 80)),
                          "country": rng.choice(["de", "fr", "us", "br", "jp", "in"], shape.users)})
    items = _topic_features(shape, rng, topic, weight, iid)
    inter = pd.DataFrame({"user_id": uid[user], "item_id": iid[item],
                          "timestamp": pd.to_datetime(times, unit="s", utc=True), "rating": rating})
    logs = _ranking_logs(shape, rng, times, user, liked, bounds, cum, topic, uid, iid) if shape.log_requests else None
    return users, items, inter, logs


def _ranking_logs(shape: Shape, rng: np.random.Generator, times: np.ndarray, user: np.ndarray,
                  liked: np.ndarray, bounds: np.ndarray, cum: np.ndarray, topic: np.ndarray,
                  uid: np.ndarray, iid: np.ndarray) -> pd.DataFrame:
    """One row per (request, retrieved item) in the contract's ranking_logs: requests at a share of
    the event times, log_retrieved items each (half from the user's first topic, half by popularity),
    the 20 best by a noisy score ranked, the 10 best of those shown; a shown item is clicked with a
    chance that falls with its position and is higher in the user's topics."""
    req = np.flatnonzero(rng.random(len(times)) < shape.log_requests)
    r, c = len(req), shape.log_retrieved
    u = user[req]
    own = np.repeat(liked[u, 0], c).reshape(r, c)
    pop = rng.random((r, c)) < 0.5
    lo = np.where(pop, 0, bounds[own])
    hi = np.where(pop, shape.items, bounds[own + 1])
    lo, hi = np.where(hi <= lo, 0, lo), np.where(hi <= lo, shape.items, hi)
    item = draw_within(cum, lo.ravel(), hi.ravel(), rng).reshape(r, c)
    relevant = (topic[item] == own)                                                       # (r, c)
    score = relevant + np.log(cum[item + 1] - cum[item]) * 0.1 + rng.normal(0, 1.0, (r, c))
    order = np.argsort(-score, axis=1)
    position = np.empty((r, c), dtype=np.int64)
    np.put_along_axis(position, order, np.arange(1, c + 1)[None, :].repeat(r, 0), axis=1)
    stage = np.where(position <= 10, "shown", np.where(position <= 20, "ranked", "retrieved"))
    clicked = (position <= 10) & (rng.random((r, c)) < (0.3 + 0.4 * relevant) / position)
    logs = pd.DataFrame({
        "request_id": np.char.add("r", np.repeat(np.arange(r), c).astype(str)).astype(object),
        "user_id": uid[np.repeat(u, c)], "item_id": iid[item.ravel()],
        "timestamp": pd.to_datetime(np.repeat(times[req], c), unit="s", utc=True),
        "stage": stage.ravel().astype(object),
        "position": pd.array(position.ravel(), dtype="Int64"),
        "ranker_score": np.round(score.ravel(), 4), "clicked": clicked.ravel()})
    # an item retrieved twice for one request is one row: the furthest it got (its best position)
    logs = logs.assign(_p=position.ravel()).sort_values(["request_id", "_p"], kind="stable")
    logs = logs.drop_duplicates(["request_id", "item_id"]).drop(columns="_p").reset_index(drop=True)
    logs.loc[logs["stage"] != "shown", "position"] = pd.NA    # a position only where the item was shown
    return logs


def write_source(users: pd.DataFrame, items: pd.DataFrame, inter: pd.DataFrame, logs: pd.DataFrame | None,
                 out_dir: Path) -> Path:
    """The contract files (parquet) of a whole generated data set into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    users.to_parquet(out_dir / "users.parquet", index=False)
    items.to_parquet(out_dir / "items.parquet", index=False)
    inter.to_parquet(out_dir / "interactions.parquet", index=False)
    if logs is not None:
        logs.to_parquet(out_dir / "ranking_logs.parquet", index=False)
    return out_dir


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
