"""Which trained ranker to serve (`rank.serve: auto`): the best on validation requests by a metric
that position bias cannot fool.

Raw clicks favour whatever the logger showed high, so a model that copies the logger looks good on
them. With the simulator's truth the choice is made on true relevance (NDCG@k); without it, by the
inverse-propensity-weighted DCG of the clicks (Joachims et al. 2017; Agarwal et al. 2019): each click
counts 1 / P(examined | its logged position), the propensities the bias models estimated, so the
estimate is unbiased for the relevance DCG of the model's order under the position-based model. The
validation requests are held apart from both training and the test split, by user where the log has
enough users (`validation_by`): the served ranker meets users (and their items) that training never
saw, and a validation on the training users' other requests favours what memorizes them.

A few dozen validation requests cannot tell apart candidates a few thousandths of NDCG apart, so where
the clicks are position-biased a naive candidate (no position correction) has to lead the best
corrected one by more than the validation's noise (its standard error clustered by user) to be
served (`naive_lead`): when both are within noise, the model whose training is consistent under the
known bias is the safer one. Measured with
`towerflow rank ltr-bench` (confounding logger, 10 sessions): naive LightGBM validated 0.797 vs dla's
0.791 on one seed and then scored 0.736 vs 0.750 on the held-out queries.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models.ranking.data import RankBatch, ValidBy
from models.ranking.dla import DualLearning
from models.ranking.evaluate import propensity_curve, relevance_ndcg_per_request
from models.ranking.lambdarank import LambdaRanker
from models.ranking.ranker import ClickRanker, Naive, Ranker

MIN_PROPENSITY = 0.05     # clip: one click at a position seen 1% of the time would weigh 100x
NAIVE_LEAD_Z = 1.645      # one-sided 95%: a naive candidate's lead must exceed this many standard errors
BIASED_BELOW = 0.8        # clicks are position-biased when the deepest examination is below this (vs the top)
ESTIMATORS = ("pal", "additive", "dot", "bilinear", "xpa", "dla")   # bias models whose curve the weights use


# validation by user needs enough validation users for the figure to mean something: below this many
# expected ones (log users × validation_fraction), auto holds out requests instead
MIN_VALIDATION_USERS = 20


@dataclass(frozen=True)
class ValidationSplit:
    """How the validation requests were held out (ranking.json `serve.validation_split`)."""
    by: ValidBy
    fraction: float
    log_users: int
    reason: str

    def to_dict(self) -> dict:
        return {"by": self.by, "fraction": self.fraction, "log_users": self.log_users, "reason": self.reason}


def validation_by(setting: Literal["auto", "user", "request"], log_users: int, fraction: float) -> ValidationSplit:
    """rank.validation_by resolved for a log with `log_users` distinct users."""
    if setting != "auto":
        return ValidationSplit(setting, fraction, log_users, "rank.validation_by")
    expected = log_users * fraction
    if expected >= MIN_VALIDATION_USERS:
        return ValidationSplit("user", fraction, log_users,
                               f"auto: ~{expected:.0f} validation users (>= {MIN_VALIDATION_USERS}), none of them in training")
    return ValidationSplit("request", fraction, log_users,
                           f"auto: {log_users} users give ~{expected:.1f} validation users (< {MIN_VALIDATION_USERS}); "
                           "held out by request, whose users and items training saw")


@dataclass(frozen=True)
class Choice:
    served: str
    metric: str                          # "ndcg@k vs truth" or "ipw_dcg@k"
    validation: dict[str, float]         # every candidate's figure
    propensity: list[float] | None       # the curve the weights used (relative to position 1)
    estimated_by: str | None
    biased: bool | None                  # the clicks are known to be position-biased
    warning: str | None = None
    naive_lead: NaiveLead | None = None  # a naive candidate validated best on biased clicks: its lead

    def to_dict(self) -> dict:
        return {"mode": "auto", "served": self.served, "metric": self.metric, "validation": self.validation,
                "propensity": self.propensity, "propensity_from": self.estimated_by,
                "position_biased": self.biased, "warning": self.warning,
                "naive_lead": None if self.naive_lead is None else self.naive_lead.to_dict()}


def ipw_dcg_per_request(model: Ranker | LambdaRanker, batches: Iterable[RankBatch], propensity: np.ndarray,
                        k: int = 10) -> np.ndarray:
    """(R,) per request: Σ over clicked items in the model's top k of 1 / (propensity of the logged
    position · log2(1 + the model's rank)). `propensity[p - 1]`: examination at position p (relative
    to the top); positions beyond the curve use its last value."""
    prop = torch.as_tensor(np.maximum(propensity, MIN_PROPENSITY), dtype=torch.float64)      # (P,)
    model.eval()
    per_request = []
    with torch.no_grad():
        for b in batches:
            scores = model.ranking_scores(b).masked_fill(~b.mask, float("-inf"))          # (R, L)
            rank = torch.argsort(torch.argsort(scores, dim=1, descending=True, stable=True), dim=1) + 1
            weight = 1.0 / prop[(b.position.clamp(min=1) - 1).clamp(max=len(prop) - 1)]     # (R, L)
            gain = b.clicked.to(torch.float64) * weight / torch.log2(rank.to(torch.float64) + 1.0)
            per_request.append((gain * (b.mask & (rank <= k))).sum(dim=1))
    return torch.cat(per_request).numpy() if per_request else np.empty(0)


def ipw_dcg(model: Ranker | LambdaRanker, batches: Iterable[RankBatch], propensity: np.ndarray, k: int = 10) -> float:
    """Mean over requests of ipw_dcg_per_request (0 without requests)."""
    values = ipw_dcg_per_request(model, batches, propensity, k)
    return float(values.mean()) if len(values) else 0.0


@dataclass(frozen=True)
class NaiveLead:
    """A naive candidate's paired lead over the best position-corrected one on the validation requests
    (ranking.json `serve.naive_lead`)."""
    naive: str
    corrected: str
    lead: float                # mean per-request difference (naive − corrected)
    standard_error: float      # clustered by user
    requests: int
    users: int                 # the clusters: distinct users of those requests
    significant: bool          # lead > NAIVE_LEAD_Z standard errors: the naive candidate is served

    def to_dict(self) -> dict:
        return {"naive": self.naive, "corrected": self.corrected, "lead": round(self.lead, 5),
                "standard_error": round(self.standard_error, 5), "requests": self.requests,
                "users": self.users, "z": NAIVE_LEAD_Z, "significant": self.significant}


def naive_lead(naive: str, corrected: str, per_request: Mapping[str, np.ndarray],
               users: np.ndarray | None = None) -> NaiveLead:
    """The paired difference of two candidates' per-request figures (requests where both are defined),
    its standard error clustered by user (`users`: (R,) the user of each request; None: every request
    its own user). A user's requests share the user's taste, so they err together: on ltr-bench with
    100 random sessions per query the 3,844 validation requests of seed 43 came from 48 queries, and
    counted as independent (± 0.0017) they made naive LightGBM's 0.011 lead look certain; by query it
    is ± 0.015, and the served position-corrected LightGBM then scored 0.744 against naive's 0.730."""
    diff = per_request[naive] - per_request[corrected]
    defined = ~np.isnan(diff)
    diff = diff[defined]
    groups = np.arange(len(diff)) if users is None else np.asarray(users)[defined]
    n = len(diff)
    lead = float(diff.mean()) if n else 0.0
    _, cluster = np.unique(groups, return_inverse=True)
    g = int(cluster.max()) + 1 if n else 0
    if g > 1:
        # CR1 sandwich variance of a mean: Σ_g (Σ_{i∈g} (d_i − d̄))² / n² · G / (G − 1); with one
        # request per user it is the plain var(ddof=1) / n
        sums = np.bincount(cluster, weights=diff - lead, minlength=g)
        se = float(np.sqrt((sums ** 2).sum() * g / (g - 1)) / n)
    else:
        se = float("inf")
    return NaiveLead(naive, corrected, lead, se, n, g, bool(g > 1 and lead > NAIVE_LEAD_Z * se))


def request_users(batches: Iterable[RankBatch]) -> np.ndarray:
    """(R,) the user index of each request, in the order the per-request figures come."""
    users = [b.user.numpy() for b in batches]
    return np.concatenate(users) if users else np.empty(0, np.int64)


def estimated_propensity(models: Mapping[str, Ranker | LambdaRanker], batches: Iterable[RankBatch],
                         positions: Sequence[int]) -> tuple[np.ndarray | None, str | None]:
    """The examination curve of the first trained bias model of ESTIMATORS, on `batches`."""
    for name in ESTIMATORS:
        model = models.get(name)
        if isinstance(model, (ClickRanker, DualLearning)) and not isinstance(model, Naive):
            return propensity_curve(model, batches, positions), name
    return None, None


def _naive(model: Ranker | LambdaRanker) -> bool:
    """Learns from raw clicks without any position correction."""
    return isinstance(model, Naive) or (isinstance(model, LambdaRanker) and not model.position)


def choose(models: Mapping[str, Ranker | LambdaRanker], valid: Iterable[RankBatch], positions: Sequence[int],
           truth: str | None, k: int = 10) -> Choice:
    """The model with the best debiased validation figure (truth: the name of a true-relevance column
    of the batches, else None). A naive model chosen while the clicks are position-biased, or any
    choice made without propensities, carries a warning (recorded in ranking.json, never silent)."""
    if not any(len(b.user) for b in valid):        # a tiny log: no request fell in the validation buckets
        served = next((n for n in ESTIMATORS if n in models), next(iter(models)))
        return Choice(served, "none", {}, None, None, None,
                      f"no validation requests (rank.validation_fraction too small for this log): served {served}")
    curve, source = estimated_propensity(models, valid, positions)
    biased = None if curve is None else bool(curve.min() < BIASED_BELOW)
    if truth is not None:
        metric = f"ndcg@{k} vs truth"
        per_request = {n: relevance_ndcg_per_request(m, valid, k, truth=truth) for n, m in models.items()}
    else:
        metric = f"ipw_dcg@{k}"
        weights = curve if curve is not None else np.ones(len(positions))
        per_request = {n: ipw_dcg_per_request(m, valid, weights, k) for n, m in models.items()}
    figures = {n: float(np.nanmean(v)) if np.isfinite(v).any() else np.nan for n, v in per_request.items()}
    served = max(figures, key=lambda n: -np.inf if np.isnan(figures[n]) else figures[n])
    lead = None
    corrected = [n for n in models if not _naive(models[n]) and not np.isnan(figures[n])]
    if biased and _naive(models[served]) and corrected:
        lead = naive_lead(served, max(corrected, key=figures.__getitem__), per_request, request_users(valid))
        if not lead.significant:
            served = lead.corrected
    warning = None
    if curve is None and truth is None:
        warning = ("no bias model estimated the propensities (add pal or additive to rank.models): "
                   "the served ranker was chosen on raw clicks, which favour the logger's order")
    elif _naive(models[served]) and biased:
        warning = (f"a naive model (no position correction) validated best although the clicks are "
                   f"position-biased (examination falls to {curve.min():.2f} of the top)"
                   + (f", by {lead.lead:.4f} ± {lead.standard_error:.4f} over {lead.corrected}" if lead else ""))
    return Choice(served, metric, {n: float(v) for n, v in figures.items()},
                  None if curve is None else np.round(curve, 4).tolist(), source, biased, warning, lead)
