"""A small synthetic dataset in the data contract (docs/DATA.md), with learnable structure.

Users belong to taste groups; each group prefers a few genres; items carry genres, a year and a
popularity. Used by tests as a `data.source` directory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ["action", "comedy", "drama", "horror", "romance", "scifi", "docs", "kids"]


def make_contract_dataset(
    out_dir: Path,
    n_users: int = 200,
    n_items: int = 150,
    per_user: tuple[int, int] = (8, 40),
    seed: int = 0,
    string_ids: bool = False,
    with_logs: bool = False,
) -> Path:
    """Write users/items/interactions(.parquet) [+ ranking_logs] into out_dir; return out_dir."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    uid = (lambda i: f"u{i:04d}") if string_ids else (lambda i: i + 1)
    iid = (lambda i: f"i{i:04d}") if string_ids else (lambda i: 1000 + i)

    n_groups = 4
    group = rng.integers(0, n_groups, n_users)
    group_genres = [rng.choice(len(GENRES), 2, replace=False) for _ in range(n_groups)]
    item_genres = [sorted(set(rng.choice(len(GENRES), rng.integers(1, 3), replace=False))) for _ in range(n_items)]
    pop = rng.zipf(1.6, n_items).clip(1, 200).astype(float)

    users = pd.DataFrame({
        "user_id": [uid(i) for i in range(n_users)],
        "age_bucket": rng.choice(["<18", "18-24", "25-34", "35-44", "45+"], n_users),
        "gender": rng.choice(["F", "M"], n_users),
        "occupation": [f"occ{g}{rng.integers(0, 2)}" for g in group],
    })
    items = pd.DataFrame({
        "item_id": [iid(i) for i in range(n_items)],
        "genres": [[GENRES[g] for g in gs] for gs in item_genres],
        "year": rng.integers(1950, 2000, n_items).astype("int64"),
        "title": [f"Item {i}" for i in range(n_items)],
    })

    t0 = pd.Timestamp("2024-01-01", tz="UTC").value // 10**9
    rows = []
    for u in range(n_users):
        liked = set(group_genres[group[u]])
        affinity = np.array([3.0 if liked & set(g) else 0.3 for g in item_genres]) * pop
        p = affinity / affinity.sum()
        n = int(rng.integers(per_user[0], per_user[1] + 1))
        chosen = rng.choice(n_items, size=min(n, n_items), replace=False, p=p)
        start = t0 + int(rng.integers(0, 30 * 86400))
        times = start + np.sort(rng.integers(0, 60 * 86400, len(chosen)))
        for i, t in zip(chosen, times):
            rows.append((uid(u), iid(i), int(t), float(rng.integers(1, 6))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    inter["timestamp"] = pd.to_datetime(inter["timestamp"], unit="s", utc=True)

    users.to_parquet(out_dir / "users.parquet", index=False)
    items.to_parquet(out_dir / "items.parquet", index=False)
    inter.to_parquet(out_dir / "interactions.parquet", index=False)
    if with_logs:
        _make_logs(inter, items, rng).to_parquet(out_dir / "ranking_logs.parquet", index=False)
    return out_dir


def _make_logs(inter: pd.DataFrame, items: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Tiny source-provided ranking logs: 20 retrieved, 10 ranked, 5 shown per request."""
    anchors = inter.sample(frac=0.1, random_state=1)
    rows = []
    for r, (_, a) in enumerate(anchors.iterrows()):
        cands = rng.choice(items["item_id"].to_numpy(), 20, replace=False)
        scores = rng.normal(size=20)
        order = np.argsort(-scores)
        for rank, j in enumerate(order):
            stage = "shown" if rank < 5 else ("ranked" if rank < 10 else "retrieved")
            pos = rank + 1 if stage == "shown" else None
            rows.append((f"r{r}", a.user_id, cands[j], a.timestamp, stage, pos, float(scores[j]),
                         bool(stage == "shown" and rng.random() < 0.3 / (rank + 1))))
    logs = pd.DataFrame(rows, columns=["request_id", "user_id", "item_id", "timestamp", "stage",
                                       "position", "ranker_score", "clicked"])
    logs["position"] = logs["position"].astype("Int64")
    return logs
