"""Position-bias click models of two towers (read top to bottom): a relevance tower and a bias tower
whose outputs make the click (PAL: a product; additive: a sum of logits; dot / bilinear: vectors),
with the disentangling options of Zhang et al. 2023 (observation dropout, gradient reversal).

A click in a ranking log needs the user to examine the item (position, layout, device) and to find it
relevant (user × item); these models factorize it so, train both towers on the shown impressions and
serve with the relevance tower alone. The cross-positional attention model (xpa.py) builds on
`TwoTowerRanker`.
"""
from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.ranking.bias import BiasTower
from models.ranking.config import RankerConfig
from models.ranking.data import RankBatch
from models.ranking.losses import bernoulli_nll, grad_reverse, log1mexp, logit_pair, masked_mean
from models.ranking.ranker import ClickRanker


def standardize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R, L, D) zero mean, unit variance per feature over the shown impressions of the batch."""
    m = mask.unsqueeze(-1).to(x.dtype)                                       # (R, L, 1)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum(dim=(0, 1)) / n                                       # (D,)
    var = (((x - mean) * m) ** 2).sum(dim=(0, 1)) / n                        # (D,)
    return (x - mean) / (var + 1e-6).sqrt()                                  # (R, L, D)


class TwoTowerRanker(ClickRanker):
    """Relevance tower + bias tower. Subclasses say how they make a click (`click`).

    The disentangling options of Zhang et al. 2023 ("Towards Disentangling Relevance and Bias in
    Unbiased Learning to Rank", KDD) apply to every subclass: when the logging ranker was good, position
    carries relevance and the bias tower can absorb it (confounding).
    """

    drops_position = False    # Zhao et al. 2019 position dropout (models served at "unknown position")

    def __init__(self, cfg: RankerConfig, tables: dict[str, np.ndarray] | None = None,
                 rel_out: int = 1, bias_out: int = 1):
        super().__init__(cfg, tables, rel_out)
        self.bias = BiasTower(cfg, bias_out)
        # gradient reversal: this head predicts the relevance output from the bias output and its
        # gradient reaches the bias tower reversed, so the bias tower unlearns what predicts relevance
        self.adversary = nn.Linear(bias_out, rel_out) if cfg.grad_reversal > 0 else None

    def bias_output(self, batch: RankBatch) -> torch.Tensor:
        drop = None
        if self.training and self.drops_position and self.cfg.position_dropout > 0:
            drop = torch.rand(batch.mask.shape, device=batch.mask.device) < self.cfg.position_dropout             # (R, L)
        return self.observation_dropout(self.bias(batch, drop))                         # (R, L, out)

    def observation_dropout(self, b: torch.Tensor) -> torch.Tensor:
        """Zhang et al. 2023: zero the bias output of a share of impressions; there the relevance tower
        must explain the click alone, so relevance the bias tower took over through the logger's
        positions flows back. Not rescaled: the bias is a logit, and serving drops it anyway."""
        if not self.training or self.cfg.observation_dropout == 0:
            return b
        keep = torch.rand(b.shape[:-1] + (1,), device=b.device) >= self.cfg.observation_dropout          # (R, L, 1)
        return b * keep

    def adversary_loss(self, b: torch.Tensor, rel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gradient reversal (Zhang et al. 2023): 0 when off or at evaluation.

        Both sides are standardized over the batch's impressions first. The click loss does not change
        when the bias output shifts or grows and the relevance output compensates (b + c, r − c); an
        adversary on raw values lets the reversed gradient run along that free direction without end
        (measured: bias logits in the hundreds after 5 epochs). Standardized, the only way to fool the
        adversary is to carry less information about relevance."""
        if self.adversary is None or not self.training:
            return rel.new_zeros(())
        pred = self.adversary(grad_reverse(standardize(b, mask), self.cfg.grad_reversal))  # (R, L, ro)
        target = standardize(rel.detach(), mask)                                         # (R, L, ro)
        return masked_mean(((pred - target) ** 2).mean(dim=-1), mask)

    @abstractmethod
    def click(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log P(click), log P(no click)) (R, L) each, and the adversary's loss (0 when off)."""

    def log_click(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor]:
        log_p, log_not_p, _ = self.click(batch)
        return log_p, log_not_p

    def loss(self, batch: RankBatch) -> torch.Tensor:
        log_p, log_not_p, aux = self.click(batch)
        return bernoulli_nll(log_p, log_not_p, batch.clicked, batch.mask) + aux


class CombinedTowers(TwoTowerRanker):
    """The click from the two towers' outputs of each impression alone; subclasses say how (`combine`).
    (The cross-positional model, xpa.py, also looks at the other impressions of the list.)"""

    @abstractmethod
    def combine(self, rel: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log P(click), log P(no click)) (R, L) from the relevance and bias outputs."""

    def click(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, rel = self.relevance(batch.user, batch.item, batch.logged_score)  # (R, L, ro)
        b = self.bias_output(batch)                                          # (R, L, bo)
        return (*self.combine(rel, b), self.adversary_loss(b, rel, batch.mask))


class PAL(CombinedTowers):
    """Guo et al. 2019, "PAL: a position-bias aware learning framework for CTR prediction" (RecSys):
    P(click) = P(seen | position, context) · P(relevant | user, item), BCE on the product."""

    def combine(self, rel: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = F.logsigmoid(b.squeeze(-1)) + F.logsigmoid(rel.squeeze(-1))  # (R, L)
        return log_p, log1mexp(log_p)


class Additive(CombinedTowers):
    """Zhao et al. 2019, "Recommending what video to watch next" (RecSys): a shallow tower adds a
    position logit to the relevance logit; 10% of impressions train it with the position unknown,
    which is what serving assumes."""

    drops_position = True

    def combine(self, rel: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logit_pair(rel.squeeze(-1) + b.squeeze(-1))                   # (R, L) each


class DotProduct(CombinedTowers):
    """Yan et al. 2022, "Revisiting two-tower models for unbiased learning to rank" (SIGIR): both towers
    output vectors and the click logit is r·e, so how much position matters can depend on the item;
    bilinear: r·W·e + w1·r + w2·e + b. Serving scores r against e of an unknown position (position
    dropout trains that vector), which keeps the relevance ordering free of any logged position."""

    drops_position = True

    def __init__(self, cfg: RankerConfig, tables: dict[str, np.ndarray] | None = None,
                 bilinear: bool = False):
        super().__init__(cfg, tables, rel_out=cfg.vector_dim, bias_out=cfg.vector_dim)
        d = cfg.vector_dim
        self.bilinear = nn.Bilinear(d, d, 1) if bilinear else None           # r·W·e + b
        self.w_rel = nn.Linear(d, 1, bias=False) if bilinear else None       # w1·r
        self.w_bias = nn.Linear(d, 1, bias=False) if bilinear else None      # w2·e

    def logit(self, rel: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.bilinear is None or self.w_rel is None or self.w_bias is None:
            return (rel * b).sum(dim=-1)                                     # (...,)
        b = b.expand_as(rel)
        return (self.bilinear(rel, b) + self.w_rel(rel) + self.w_bias(b)).squeeze(-1)  # (...,)

    def combine(self, rel: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logit_pair(self.logit(rel, b))

    def relevance_score(self, rel: torch.Tensor) -> torch.Tensor:
        return self.logit(rel, self.bias.unknown())                          # (...,)
