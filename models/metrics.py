"""Full-catalog top-K retrieval metrics with binary gains.

Every user is ranked against the whole catalog (no sampled negatives, which inflate and reorder
results: Krichene & Rendle 2020, "On Sampled Metrics for Item Recommendation"). Items the user already
interacted with in training are removed from the ranking before the top K are taken.

Per K: Recall@K (hits / |relevant|), NDCG@K (IDCG over min(K, |relevant|)), HitRate@K (≥1 hit),
averaged over users with ≥1 relevant item; Coverage@K (share of the catalog that appears in at least
one user's top K); TailRecall@K (Recall@K counting only relevant tail items, averaged over users with
≥1 relevant tail item; the ranking itself is unchanged). The tail is the less popular part of the
catalog by training interactions (`tail_items`). ColdRecall@K: the same over the items no training
row holds (scored from their features alone; a popularity count or EASE gives them nothing), averaged
over users with ≥1 relevant cold item. Both are item groups: `groups={"tail": mask, "cold": mask}`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from models.holdout import CatalogTask
    from models.params import EvaluateParams

METRICS = ("recall", "ndcg", "hitrate", "coverage", "tail_recall", "cold_recall")
Scorer = Callable[[int, int], torch.Tensor]     # scores(start, end) → (end - start, n_items) of those queries
GROUP_SUFFIX = "_recall"     # a group's metric: "<group>_recall" (tail_recall, cold_recall)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(U, k) columns of the k best scores per row, best first, ties broken by the lower column.

    torch.topk picks arbitrarily among equal scores, which moves popularity baselines (many items share
    a count) by ~0.001 between runs and machines; a stable order makes every figure reproducible.
    Linear in the catalog. A row whose (k+1)-th best score is below its k-th has exactly one top-k
    set, which torch.topk finds; only rows with a tie across the k-th place (popularity baselines,
    excluded items' -inf) take the exact path, `_tied_top_k`: on 20k users x 30k items the evaluate
    stage's rankings took 33 s with the exact path for every row.
    """
    # a NaN anywhere makes the sum NaN (so do +inf beside -inf: then the exact check decides); the sum is
    # one vectorized pass, isnan(scores).any() fills a bool copy first (1.3 vs 19 ms at 512 x 30k)
    if torch.isnan(scores.sum()) and torch.isnan(scores).any():
        scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if k >= scores.shape[1]:
        return _tied_top_k(scores, k)
    values, cols = torch.topk(scores, k + 1, dim=1)                       # (U, k+1), best first
    tied = values[:, k] == values[:, k - 1]                               # (U,) the k-th place is shared
    cols = torch.sort(cols[:, :k], dim=1).values                          # ascending columns
    order = torch.sort(scores.gather(1, cols), dim=1, descending=True, stable=True).indices
    top = cols.gather(1, order)
    if tied.any():
        top[tied] = _tied_top_k(scores[tied], k)
    return top


def _tied_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """top_k for rows with ties across the k-th place: every item above the k-th value, then the
    first tied items by column."""
    kth = torch.topk(scores, k, dim=1).values[:, -1:]                    # (U, 1)
    above = scores > kth                                                  # (U, I)
    tied = scores == kth                                                  # (U, I)
    room = k - above.sum(dim=1, keepdim=True)                             # (U, 1) tied slots left
    chosen = above | (tied & (torch.cumsum(tied, dim=1) <= room))         # (U, I), k True per row
    cols = chosen.nonzero()[:, 1].view(scores.shape[0], k)                # (U, k) ascending columns
    order = torch.sort(scores.gather(1, cols), dim=1, descending=True, stable=True).indices
    return cols.gather(1, order)


def tail_items(train_item_cols: np.ndarray, n_items: int, head_share: float = 0.2) -> np.ndarray:
    """(n_items,) bool: True for the tail, every item outside the `head_share` most popular items of the
    catalog by training interactions (ties broken by the lower column, as in the rankings)."""
    counts = np.bincount(np.asarray(train_item_cols, dtype=np.int64), minlength=n_items)[:n_items]
    n_head = int(round(head_share * n_items))
    order = np.argsort(-counts, kind="stable")
    tail = np.ones(n_items, dtype=bool)
    tail[order[:n_head]] = False
    return tail


def ranking_metrics(top: torch.Tensor, relevant: torch.Tensor, ks: list[int],
                    groups: dict[str, torch.Tensor] | None = None,
                    counts: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Per-user metrics (each (U,)) of ranked item lists.

    top (U, Kmax) item columns, best first; relevant (U, I) bool, each row with at least one True;
    groups: item groups (name -> (I,) bool, e.g. "tail"), each giving <name>_recall@K, NaN for users
    without a relevant item of the group. counts: each row's relevant items and relevant items per
    group when the caller has them (relevant_counts), else they are counted in `relevant`.
    """
    groups = groups or {}
    hits = relevant.gather(1, top).to(torch.float64)                      # (U, Kmax)
    if counts is None:
        counts = (relevant.sum(dim=1), {g: (relevant & mask).sum(dim=1) for g, mask in groups.items()})
    n_rel = counts[0].to(torch.float64)                                   # (U,)
    discount = 1.0 / torch.log2(torch.arange(2, top.shape[1] + 2, dtype=torch.float64))  # (Kmax,)
    ideal = torch.cumsum(discount, dim=0)                                 # (Kmax,) IDCG for n relevant
    group_hits = {g: hits * mask[top].to(torch.float64) for g, mask in groups.items()}   # (U, Kmax) each
    out = {}
    for k in ks:
        if k > top.shape[1]:
            raise ValueError(f"ranking holds {top.shape[1]} items, cannot score @{k}")
        out[f"recall@{k}"] = hits[:, :k].sum(dim=1) / n_rel
        dcg = (hits[:, :k] * discount[:k]).sum(dim=1)                     # (U,)
        n_ideal = torch.clamp(n_rel, max=k).to(torch.long) - 1            # (U,)
        out[f"ndcg@{k}"] = dcg / ideal[n_ideal]
        out[f"hitrate@{k}"] = (hits[:, :k].sum(dim=1) > 0).to(torch.float64)
        for g, g_hits in group_hits.items():                              # NaN where a user has none
            out[f"{g}{GROUP_SUFFIX}@{k}"] = g_hits[:, :k].sum(dim=1) / counts[1][g].to(torch.float64)
    return out


def relevant_counts(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int,
                    groups: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(n_rows,) relevant items per row and, per item group (name -> (n_cols,) bool), the relevant
    items of the group per row, from a batch's (row, column) pairs; a pair listed twice counts once,
    as in the bool matrix it marks. Counting pairs, not that (rows x catalog) matrix: a bool matrix's sum along its rows is not
    vectorized in torch (512 users x 30k items ~45 ms, twice per batch: 9 s of the 700k shape's
    evaluate stage); a batch holds a few thousand pairs."""
    key = torch.unique(rows * n_cols + cols)
    row = key // n_cols
    n_rel = torch.bincount(row, minlength=n_rows)
    col = key % n_cols
    return n_rel, {g: torch.bincount(row[mask[col]], minlength=n_rows) for g, mask in (groups or {}).items()}


def pairs_by_row(pairs: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) pairs sorted by row, so that a batch of users is a slice (rows_between)."""
    # Arrow hands numpy arrays that are read-only views; torch cannot share those (it warns), so a
    # read-only one is copied once here.
    rows, cols = (torch.from_numpy(np.require(a, dtype=np.int64, requirements="W")) for a in pairs)
    order = torch.argsort(rows, stable=True)
    return rows[order], cols[order]


def rows_between(rows: torch.Tensor, start: int, end: int) -> slice:
    """The slice of sorted rows in [start, end): a mask over every pair per batch would make the
    metrics quadratic in the data (pairs × batches: 8M × 2,000 at 10M interactions)."""
    lo, hi = torch.searchsorted(rows, torch.tensor([start, end])).tolist()
    return slice(lo, hi)


def scored_batches(scores: Callable[[int, int], torch.Tensor], n_users: int, n_items: int,
                   seen: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, the (end - start, n_items) scores of users start..end-1 with each one's seen items
    at -inf) batch by batch; seen: (row, column) pairs sorted by row (pairs_by_row). The batches share
    one buffer, each valid until the next: a fresh block of this size is a new mmap whose first touch
    faults in every page (a copy of 512 x 30k scores: 17.8 ms into a new block, 2.7 into a used one)."""
    seen_rows, seen_cols = seen
    buf: torch.Tensor | None = None
    for start in range(0, n_users, batch_size):
        end = min(start + batch_size, n_users)
        batch = scores(start, end)                                       # (b, I), the scorer's own
        if buf is None or buf.dtype != batch.dtype:
            buf = torch.empty((min(batch_size, n_users), n_items), dtype=batch.dtype)
        s = buf[: end - start].copy_(batch)
        in_seen = rows_between(seen_rows, start, end)
        s[seen_rows[in_seen] - start, seen_cols[in_seen]] = float("-inf")
        yield start, end, s


def full_catalog_metrics(
    scores: Callable[[int, int], torch.Tensor],
    n_users: int,
    n_items: int,
    seen: tuple[np.ndarray, np.ndarray],
    relevant: tuple[np.ndarray, np.ndarray],
    ks: list[int],
    metrics: tuple[str, ...] = ("recall", "ndcg"),
    groups: dict[str, np.ndarray] | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Mean `metrics` @ each K over users (see the module docstring), scoring them batch by batch.

    scores(start, end) → (end-start, n_items) scores of users start..end-1 against every item;
    seen and relevant are (user row, item column) index pairs: excluded items and held-out items;
    metrics ⊆ METRICS; a group's recall (tail_recall, cold_recall) needs its (n_items,) bool mask in
    groups ({"tail": ..., "cold": ...}). Memory: batch_size × n_items.
    """
    return catalog_figures(scores, n_users, n_items, seen, relevant, ks, metrics, groups, batch_size).means


class Figures(NamedTuple):
    """catalog_figures' answer: each figure's mean over users, its standard error, and (when asked) its
    per-user values, (n_users,) float32 with NaN where a user has none (a group with no relevant
    item), for paired comparisons of two models on the same users."""
    means: dict[str, float]
    errors: dict[str, float]
    users: dict[str, np.ndarray]


def paired_errors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """The standard error of the mean difference b - a of each figure both hold, over the users that
    have it in both (Figures.users of two models scored on the same users): the users' own easy and
    hard cases cancel, so for two similar models it is well below their errors combined. A figure with
    fewer than two such users has none."""
    out = {}
    for name in a.keys() & b.keys():
        diff = (b[name].astype(np.float64) - a[name].astype(np.float64))
        diff = diff[~np.isnan(diff)]
        if len(diff) > 1:
            out[name] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    return dict(sorted(out.items()))


def catalog_figures(
    scores: Callable[[int, int], torch.Tensor],
    n_users: int,
    n_items: int,
    seen: tuple[np.ndarray, np.ndarray],
    relevant: tuple[np.ndarray, np.ndarray],
    ks: list[int],
    metrics: tuple[str, ...] = ("recall", "ndcg"),
    groups: dict[str, np.ndarray] | None = None,
    batch_size: int = 512,
    per_user: bool = False,
) -> Figures:
    """full_catalog_metrics' means, the standard error of each mean over users (the users' sample
    standard deviation / sqrt(their number), for every figure but coverage, a catalog share, not a
    mean over users; none for a figure of fewer than two users), and with per_user each figure's
    per-user values (float32: 4 bytes a user and figure). What a reader needs to tell a lead from the
    sample's noise (the gate's checks)."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(METRICS)}")
    asked = [m.removesuffix(GROUP_SUFFIX) for m in metrics if m.endswith(GROUP_SUFFIX)]
    missing = [g for g in asked if g not in (groups or {})]
    if missing:
        g = missing[0]
        raise ValueError(f"{g}{GROUP_SUFFIX} needs the {g} item mask (groups={{'{g}': ...}})")
    k_max = min(max(ks), n_items)
    rel_rows, rel_cols = pairs_by_row(relevant)
    # one extra False column for the padding below
    masks = {g: torch.cat([torch.as_tensor(groups[g], dtype=torch.bool), torch.zeros(1, dtype=torch.bool)])
             for g in asked}
    sums: dict[str, float] = {}
    squares: dict[str, float] = {}
    counts: dict[str, int] = {}
    users: dict[str, list[np.ndarray]] = {}
    recommended = {k: torch.zeros(n_items, dtype=torch.bool) for k in ks}  # coverage
    for start, end, s in scored_batches(scores, n_users, n_items, pairs_by_row(seen), batch_size):
        rel = torch.zeros((end - start, n_items + 1), dtype=torch.bool)  # (b, I+1)
        in_rel = rows_between(rel_rows, start, end)
        rows, cols = rel_rows[in_rel] - start, rel_cols[in_rel]
        rel[rows, cols] = True
        top = top_k(s, k_max)                                            # (b, Kmax)
        ranked = torch.isfinite(s.gather(1, top))                        # (b, Kmax) not excluded
        for k in ks:
            recommended[k][top[:, :k][ranked[:, :k]]] = True
        if k_max < max(ks):  # catalog smaller than K: pad with column n_items, which nobody has
            top = torch.cat([top, torch.full((end - start, max(ks) - k_max), n_items)], dim=1)
        per_row = relevant_counts(rows, cols, end - start, n_items + 1, masks)
        for name, per_user_values in ranking_metrics(top, rel, ks, masks, per_row).items():  # (U,) each: cheap
            valid = ~torch.isnan(per_user_values)
            kept = per_user_values[valid]
            sums[name] = sums.get(name, 0.0) + float(kept.sum())
            squares[name] = squares.get(name, 0.0) + float(kept.square().sum())
            counts[name] = counts.get(name, 0) + int(valid.sum())
            if per_user:
                users.setdefault(name, []).append(per_user_values.numpy().astype(np.float32))
    out, errors = {}, {}
    for k in ks:
        for m in metrics:
            name = f"{m}@{k}"
            if m.endswith(GROUP_SUFFIX) and not counts.get(name):
                continue          # no user has a relevant item of the group: no figure, not a 0
            if m == "coverage":
                out[name] = float(recommended[k].sum()) / max(n_items, 1)
                continue
            n = counts.get(name, 0)
            out[name] = sums.get(name, 0.0) / max(n, 1)
            if n > 1:             # sample variance from the sums; rounding can take it a hair below 0
                variance = max(squares[name] - n * out[name] ** 2, 0.0) / (n - 1)
                errors[name] = math.sqrt(variance / n)
    return Figures(out, errors, {name: np.concatenate(parts) for name, parts in users.items() if name in out})


def scorer_metrics(eval_cfg: EvaluateParams, task: CatalogTask, scorer: Scorer) -> dict:
    """One model's figures on the task: recall, ndcg, hitrate, coverage, tail_recall and cold_recall
    (when a held-out item has no training row) at every K of eval_cfg.ks. The one code path of every
    model the evaluate stage scores (the baselines and the live model too), so that their figures
    are comparable."""
    return scorer_figures(eval_cfg, task, scorer).means


def scorer_figures(eval_cfg: EvaluateParams, task: CatalogTask, scorer: Scorer, per_user: bool = False) -> Figures:
    """scorer_metrics, the standard error of each figure averaged over users, and with per_user each
    figure's per-user values (catalog_figures); means and errors rounded as reports write them."""
    ks = sorted(set(eval_cfg.ks))
    figures = catalog_figures(scorer, task.n_users, task.n_items, task.seen, task.relevant, ks,
                              metrics=METRICS, groups=task.item_groups(eval_cfg.tail_share), per_user=per_user)
    return figures._replace(means=rounded(figures.means), errors=rounded(figures.errors))


def rounded(metrics: dict[str, float], digits: int = 6) -> dict[str, float]:
    """Figures as written to reports (equal inputs give an equal file)."""
    return {k: round(v, digits) for k, v in metrics.items()}
