"""The dual learning algorithm (Ai et al. 2018, "Unbiased learning to rank with unbiased propensity
estimation", SIGIR): a listwise ranker whose examination is learned jointly, not plugged in.

Two models learn from each other's estimates. The relevance tower f ranks each list by a softmax
cross-entropy over its clicks, each click weighted by the inverse of its estimated examination
relative to the list's top position (inverse propensity weighting); the bias tower g models
examination by the same softmax over the list, each click weighted by the inverse of its estimated
relevance relative to the top's. Under the position-based model the two problems are symmetric
(a click is examination times relevance), so each side's weights remove the other factor, and the
pair converges to unbiased estimates of both (the paper's Theorem). Weights are read without
gradient, as in the authors' implementation (ULTRA).

Why beside the pointwise bias models: where the logger was good (position carries relevance) it is
the one bias model measured above naive (docs/RANKING.md, LTR bench with a confounding logger over
10 seeds: 0.765 NDCG@10 vs naive LightGBM 0.747, PAL 0.682); on a random logger it is level with PAL
on big logs (0.770 vs 0.767 at 100 sessions per query) and weak on small ones (0.621 vs 0.699 at 10).
It trains at its own lr (rank.dla_lr). Not a click model: a softmax over a list says which item is
clicked, not whether one is. Serves with the relevance tower alone.
"""
from __future__ import annotations

import numpy as np
import torch

from models.ranking.bias import BiasTower, relative_examination
from models.ranking.config import RankerConfig
from models.ranking.data import RankBatch
from models.ranking.losses import weighted_list_softmax_loss
from models.ranking.ranker import Ranker

# Largest inverse weight one click may carry (ULTRA's max_propensity_weight): a click where the other
# model says "barely examined" or "barely relevant" would otherwise dominate its batch. Measured on the
# LTR world (random logger, 100 sessions per query, seed 42, NDCG@10 of held-out queries): 2 → 0.695,
# 5 → 0.725, 20 → 0.675; on the tests' simulated log 5 also recovered the examination curve better
# than 20 (Pearson 0.998 vs 0.974).
MAX_WEIGHT = 5.0


def inverse_to_top(logits: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R, L) w_i = P̂_top / P̂_i where P̂ = softmax(logits) over the list and "top" is the impression
    shown highest (smallest logged position), clipped to [0, MAX_WEIGHT]; read without gradient.
    The softmax's normalizer cancels in the ratio: w_i = exp(logit_top − logit_i)."""
    with torch.no_grad():
        pos = position.masked_fill(~mask | (position < 1), torch.iinfo(position.dtype).max)   # (R, L)
        top = pos.argmin(dim=1, keepdim=True)                                                  # (R, 1)
        gap = logits.gather(1, top) - logits                                                   # (R, L)
        return gap.clamp(max=float(np.log(MAX_WEIGHT))).exp().masked_fill(~mask, 0.0)


class DualLearning(Ranker):
    """Relevance tower + bias tower trained by the dual learning algorithm (module docstring)."""

    def __init__(self, cfg: RankerConfig, tables: dict[str, np.ndarray] | None = None):
        super().__init__(cfg, tables, rel_out=1)
        self.bias = BiasTower(cfg, 1)

    def exam_logits(self, batch: RankBatch) -> torch.Tensor:
        """(R, L) examination logit of each impression (softmax over a list: relative examination)."""
        return self.bias(batch).squeeze(-1)

    def loss(self, batch: RankBatch) -> torch.Tensor:
        _, rel = self.relevance(batch.user, batch.item, batch.logged_score)      # (R, L, 1)
        f, g = rel.squeeze(-1), self.exam_logits(batch)                          # (R, L) each
        clicks = batch.clicked * batch.mask                                      # (R, L)
        rank_loss = weighted_list_softmax_loss(f, clicks * inverse_to_top(g, batch.position, batch.mask),
                                               batch.mask)
        exam_loss = weighted_list_softmax_loss(g, clicks * inverse_to_top(f, batch.position, batch.mask),
                                               batch.mask)
        return (rank_loss + exam_loss).mean()

    def examination(self, batch: RankBatch, positions: list[int]) -> torch.Tensor:
        """(P,) examination at each position relative to position 1 (bias.relative_examination)."""
        return relative_examination(self.bias, batch, positions)
