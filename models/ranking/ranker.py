"""What every ranking model is (`Ranker`: a relevance tower and a training loss; it serves with the
relevance tower alone), click models (`ClickRanker`: a calibrated P(click) per impression), and the
naive baseline, which learns position bias as if it were relevance.

The bias-aware two-tower models are in two_tower.py, the cross-positional attention model in xpa.py,
the mixture of user types in mixture.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn as nn

from models.ranking.config import RankerConfig
from models.ranking.data import RankBatch
from models.ranking.losses import bernoulli_nll, logit_pair
from models.ranking.relevance import RelevanceTower


class Ranker(nn.Module, ABC):
    """A relevance tower and how the model learns from a log (`loss`); it serves with the relevance
    tower alone. Click models (`ClickRanker`) also give each impression's click probability."""

    def __init__(self, cfg: RankerConfig, tables: dict[str, np.ndarray] | None = None, rel_out: int = 1):
        super().__init__()
        self.cfg = cfg
        self.relevance = RelevanceTower(cfg, rel_out, tables)

    def relevance_score(self, rel: torch.Tensor) -> torch.Tensor:
        """(..., rel_out) relevance tower output → (...,) serving score."""
        return rel.squeeze(-1)

    def ranking_scores(self, batch: RankBatch) -> torch.Tensor:
        """(R, L) the serving score of every impression of the batch (position ignored)."""
        _, rel = self.relevance(batch.user, batch.item, batch.logged_score)  # (R, L, out)
        return self.relevance_score(rel)

    def score(self, users: torch.Tensor, items: torch.Tensor,
              logged_score: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) serving scores of (user, item) index pairs from the relevance tower alone."""
        ls = None if logged_score is None else logged_score.unsqueeze(1)
        _, rel = self.relevance(users, items.unsqueeze(1), ls)               # (B, 1, out)
        return self.relevance_score(rel)[:, 0]                               # (B,)

    @abstractmethod
    def loss(self, batch: RankBatch) -> torch.Tensor:
        """The training loss of one batch of requests."""


class ClickRanker(Ranker):
    """A click model: P(click) of every impression (calibrated: its log-likelihood is measured),
    trained with the Bernoulli likelihood of the logged clicks."""

    @abstractmethod
    def log_click(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log P(click), log P(no click)), each (R, L)."""

    def loss(self, batch: RankBatch) -> torch.Tensor:
        log_p, log_not_p = self.log_click(batch)
        return bernoulli_nll(log_p, log_not_p, batch.clicked, batch.mask)


class Naive(ClickRanker):
    """Naive baseline: the click is the relevance tower alone, so it learns the position bias as if it
    were relevance."""

    def log_click(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor]:
        _, rel = self.relevance(batch.user, batch.item, batch.logged_score)  # (R, L, 1)
        return logit_pair(rel.squeeze(-1))
