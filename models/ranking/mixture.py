"""Mixture-EM (Yan et al. 2022, "Revisiting two-tower models for unbiased learning to rank", SIGIR).

One two-tower model assumes every user examines a list the same way (the factorization assumption).
Here K components share the relevance tower (serving needs one relevance score) and each has its own
bias tower, e.g. impatient users whose examination falls fast and patient ones who read further.
Each component scores a request's list with the listwise softmax loss; the E-step gives the request a
posterior over components, ∝ exp(−α·(loss_k − min_k loss)), computed without gradient; the M-step
minimizes the posterior-weighted loss. A request without a click says nothing about which component
explains it, so it carries no weight.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from models.ranking.data import RankBatch
from models.ranking.losses import list_softmax_loss
from models.ranking.bias import BiasTower, relative_examination
from models.ranking.config import RankerConfig
from models.ranking.ranker import Ranker


class MixtureEM(Ranker):
    """Not a click model: a softmax over a list says which item is clicked, not whether one is."""

    def __init__(self, cfg: RankerConfig, tables: dict[str, np.ndarray] | None = None):
        super().__init__(cfg, tables, rel_out=1)
        if cfg.mixture_k < 1:
            raise ValueError(f"rank.mixture_k must be >= 1 (got {cfg.mixture_k})")
        # independent random inits are what lets EM break the symmetry between components
        self.biases = nn.ModuleList(BiasTower(cfg, 1) for _ in range(cfg.mixture_k))

    def component_logits(self, batch: RankBatch) -> torch.Tensor:
        _, rel = self.relevance(batch.user, batch.item, batch.logged_score)   # (R, L, 1)
        b = torch.stack([t(batch) for t in self.biases])                     # (K, R, L, 1)
        return (rel + b).squeeze(-1)                                          # (K, R, L)

    def list_losses(self, batch: RankBatch) -> torch.Tensor:
        logits = self.component_logits(batch)                                 # (K, R, L)
        return torch.stack([list_softmax_loss(z, batch.clicked, batch.mask) for z in logits])  # (K, R)

    def posterior(self, batch: RankBatch, losses: torch.Tensor | None = None) -> torch.Tensor:
        """(K, R) E-step: each request's weight on each component; 0 for a request without a click."""
        with torch.no_grad():
            losses = self.list_losses(batch) if losses is None else losses.detach()   # (K, R)
            # the loss is per click; the evidence of a request grows with its clicks
            n_clicks = (batch.clicked * batch.mask).sum(dim=1)                       # (R,)
            gap = (losses - losses.min(dim=0).values) * n_clicks                     # (K, R)
            post = torch.softmax(-self.cfg.mixture_alpha * gap, dim=0)               # (K, R)
            return post * (n_clicks > 0)                                             # (K, R)

    def loss(self, batch: RankBatch) -> torch.Tensor:
        losses = self.list_losses(batch)                                      # (K, R)
        post = self.posterior(batch, losses)                                  # (K, R)
        return (post * losses).sum() / post.sum().clamp(min=1)               # M-step

    def component_propensities(self, batch: RankBatch, positions: list[int]) -> torch.Tensor:
        """(K, P) each component's examination at each position relative to position 1, averaged over
        the batch's impressions (their context): exp(b_k(p) − b_k(1)) under the softmax model."""
        return torch.stack([relative_examination(tower, batch, positions) for tower in self.biases])
