"""Measure ranking models against the truth a simulator (or an annotated log) provides.

- NDCG@k of the relevance tower's ordering of each held-out request against its TRUE relevance
  (a truth column, linear gains): what debiasing is for, and what clicks alone cannot show.
- Propensity recovery: the model's examination curve against the true one, both relative to
  position 1; Pearson correlation and mean absolute error.
- Click log-likelihood of held-out impressions (click models only).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from models.ranking.data import RankBatch, RankingInputError
from models.ranking.dla import DualLearning
from models.ranking.lambdarank import LambdaRanker
from models.ranking.mixture import MixtureEM
from models.ranking.ranker import ClickRanker, Ranker


def truth_column(batch: RankBatch, name: str) -> torch.Tensor:
    if name not in batch.truth:
        raise RankingInputError(f"evaluation needs the truth column {name!r} in the log "
                                f"(read with truth=[{name!r}]); the batch has {sorted(batch.truth)}")
    return batch.truth[name]


def ndcg(scores: torch.Tensor, gains: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(R,) NDCG@k per list: rank by score (ties: logged order), linear gains; NaN when IDCG = 0."""
    gains = torch.nan_to_num(gains * mask, nan=0.0).to(torch.float64)        # (R, L)
    scores = scores.masked_fill(~mask, float("-inf"))                         # (R, L)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (R, L)
    k = min(k, gains.shape[1])
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)  # (k,)
    dcg = (gains.gather(1, order)[:, :k] * discount).sum(dim=1)              # (R,)
    idcg = (torch.sort(gains, dim=1, descending=True).values[:, :k] * discount).sum(dim=1)
    return torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), torch.nan)      # (R,)


def relevance_ndcg_per_request(model: Ranker | LambdaRanker, batches: Iterable[RankBatch], k: int = 10,
                               truth: str = "relevance") -> np.ndarray:
    """(R,) NDCG@k of each request under the serving ordering (relevance tower, no position); NaN for
    a request without any relevant item."""
    model.eval()
    per_request = []
    with torch.no_grad():
        for batch in batches:
            per_request.append(ndcg(model.ranking_scores(batch), truth_column(batch, truth), batch.mask, k))
    return torch.cat(per_request).numpy() if per_request else np.empty(0)


def relevance_ndcg(model: Ranker | LambdaRanker, batches: Iterable[RankBatch], k: int = 10,
                   truth: str = "relevance") -> float:
    """Mean NDCG@k over requests of the serving ordering (relevance tower, no position)."""
    return mean_ndcg(relevance_ndcg_per_request(model, batches, k, truth))


def mean_ndcg(per_request: np.ndarray) -> float:
    """The mean of per-request NDCGs over the requests that have one (not NaN)."""
    return float(per_request[~np.isnan(per_request)].mean())


def logged_ndcg(batches: Iterable[RankBatch], k: int = 10, truth: str = "relevance") -> float:
    """NDCG@k of the logging ranker's own order (the log's positions), for reference."""
    per_request = [ndcg(-b.position.to(torch.float64), truth_column(b, truth), b.mask, k) for b in batches]
    values = torch.cat(per_request)
    return float(values[~values.isnan()].mean())


def propensity_curve(model: ClickRanker | DualLearning, batches: Iterable[RankBatch],
                     positions: Sequence[int]) -> np.ndarray:
    """(P,) the model's click rate with every held-out impression moved to position p, over its click
    rate at position 1. Under the position-based click model this ratio is exactly the examination
    propensity relative to the top, whatever the model's inner parametrization (PAL's σ(bias), an
    additive logit, a dot product, attention). The dual learning algorithm has no click rate: its
    examination softmax gives the ratio directly (averaged over the impressions)."""
    model.eval()
    if isinstance(model, DualLearning):
        curves = [(model.examination(b, list(positions)) * b.n_examples, b.n_examples) for b in batches]
        return (sum(c for c, _ in curves) / max(sum(n for _, n in curves), 1)).numpy()
    totals = np.zeros(len(positions) + 1)
    with torch.no_grad(), model.relevance.reused():
        for batch in batches:
            for j, p in enumerate([1, *positions]):
                log_p, _ = model.log_click(batch.with_position(p))          # (R, L)
                totals[j] += float((log_p.exp() * batch.mask).sum())
    return totals[1:] / max(totals[0], 1e-12)


def propensity_recovery(estimated: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Pearson correlation and MAE of two examination curves, each normalized at its first position."""
    est = np.asarray(estimated, dtype=np.float64) / estimated[0]
    tru = np.asarray(true, dtype=np.float64) / true[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = float(np.corrcoef(est, tru)[0, 1]) if est.std() > 0 and tru.std() > 0 else float("nan")
    return {"pearson": pearson, "mae": float(np.abs(est - tru).mean())}


def click_loglik(model: Ranker, batches: Iterable[RankBatch]) -> float | None:
    """Mean log-likelihood per held-out impression; None for listwise models (no click probability)."""
    if not isinstance(model, ClickRanker):
        return None
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            log_p, log_not_p = model.log_click(batch)                       # (R, L)
            ll = batch.clicked * log_p + (1 - batch.clicked) * log_not_p    # (R, L)
            total += float((ll * batch.mask).sum())
            n += batch.n_examples
    return total / max(n, 1)


def mixture_report(model: MixtureEM, batches: Iterable[RankBatch], positions: Sequence[int],
                   true_curves: dict[int, np.ndarray] | None = None,
                   type_column: str = "user_type") -> list[dict]:
    """What each component learned: its examination curve (relative to position 1), its share of the
    held-out requests with a click, and (given the truth) the share of each user type's requests it
    takes and how its curve correlates with each type's true curve. `batches` is read three times:
    a list, or a re-iterable stream such as RankingLog."""
    model.eval()
    curves = torch.stack([model.component_propensities(b, list(positions)) * b.n_examples
                          for b in batches])                                  # (B, K, P)
    curve = (curves.sum(dim=0) / sum(b.n_examples for b in batches)).numpy()  # (K, P)
    posts = torch.cat([model.posterior(b) for b in batches], dim=1)          # (K, R)
    clicked = posts.sum(dim=0) > 0                                           # (R,)
    types = None
    if true_curves is not None:
        types = torch.cat([truth_column(b, type_column)[:, 0] for b in batches])   # (R,)
    report = []
    for k in range(curve.shape[0]):
        row: dict = {"component": k, "curve": curve[k].round(4).tolist(),
                     "share": float(posts[k, clicked].mean()) if clicked.any() else float("nan")}
        if types is not None and true_curves is not None:
            row["share_of_type"] = {int(t): float(posts[k, clicked & (types == t)].mean())
                                    for t in sorted(true_curves)}
            row["pearson_by_type"] = {int(t): propensity_recovery(curve[k], c)["pearson"]
                                      for t, c in true_curves.items()}
        report.append(row)
    return report
