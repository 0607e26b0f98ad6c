"""Full-catalog top-K retrieval metrics: Recall@K and NDCG@K with binary gains.

Every user is ranked against the whole catalog (no sampled negatives, which inflate and reorder
results: Krichene & Rendle 2020, "On Sampled Metrics for Item Recommendation"). Items the user already
interacted with in training are removed from the ranking before the top K are taken.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def ranking_metrics(top: torch.Tensor, relevant: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user metrics (each (U,)) of ranked item lists.

    top (U, Kmax) item columns, best first; relevant (U, I) bool, each row with at least one True.
    Recall@K = hits in the top K / |relevant|; NDCG@K = DCG / IDCG with IDCG over min(K, |relevant|).
    """
    hits = relevant.gather(1, top).to(torch.float64)                      # (U, Kmax)
    n_rel = relevant.sum(dim=1).to(torch.float64)                         # (U,)
    discount = 1.0 / torch.log2(torch.arange(2, top.shape[1] + 2, dtype=torch.float64))  # (Kmax,)
    ideal = torch.cumsum(discount, dim=0)                                 # (Kmax,) IDCG for n relevant
    out = {}
    for k in ks:
        if k > top.shape[1]:
            raise ValueError(f"ranking holds {top.shape[1]} items, cannot score @{k}")
        out[f"recall@{k}"] = hits[:, :k].sum(dim=1) / n_rel
        dcg = (hits[:, :k] * discount[:k]).sum(dim=1)                     # (U,)
        n_ideal = torch.clamp(n_rel, max=k).to(torch.long) - 1            # (U,)
        out[f"ndcg@{k}"] = dcg / ideal[n_ideal]
    return out


def full_catalog_metrics(
    scores: Callable[[int, int], torch.Tensor],
    n_users: int,
    n_items: int,
    seen: tuple[np.ndarray, np.ndarray],
    relevant: tuple[np.ndarray, np.ndarray],
    ks: list[int],
    batch_size: int = 512,
) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over users, scoring them batch by batch.

    scores(start, end) → (end-start, n_items) scores of users start..end-1 against every item;
    seen and relevant are (user row, item column) index pairs: excluded items and held-out items.
    """
    k_max = min(max(ks), n_items)
    seen_rows, seen_cols = (torch.as_tensor(a, dtype=torch.long) for a in seen)
    rel_rows, rel_cols = (torch.as_tensor(a, dtype=torch.long) for a in relevant)
    totals = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for start in range(0, n_users, batch_size):
        end = min(start + batch_size, n_users)
        s = scores(start, end).clone()                                   # (b, I)
        in_seen = (seen_rows >= start) & (seen_rows < end)
        s[seen_rows[in_seen] - start, seen_cols[in_seen]] = float("-inf")
        rel = torch.zeros((end - start, n_items), dtype=torch.bool)      # (b, I)
        in_rel = (rel_rows >= start) & (rel_rows < end)
        rel[rel_rows[in_rel] - start, rel_cols[in_rel]] = True
        top = torch.topk(s, k_max, dim=1).indices                        # (b, Kmax)
        if k_max < max(ks):  # catalog smaller than K: pad with a column no user has as relevant
            top = torch.cat([top, top[:, -1:].expand(-1, max(ks) - k_max)], dim=1)
            rel = torch.cat([rel, torch.zeros((end - start, 1), dtype=torch.bool)], dim=1)
            top[:, k_max:] = n_items
        for name, per_user in ranking_metrics(top, rel, ks).items():
            totals[name] += float(per_user.sum())
    return {name: total / max(n_users, 1) for name, total in totals.items()}
