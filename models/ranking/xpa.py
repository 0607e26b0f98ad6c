"""Cross-positional attention, XPA (Zhuang et al. 2021, "Cross-positional attention for debiasing
clicks", WWW).

Position-based models assume an item's click depends only on its own position and relevance (the
independence assumption). On a grid or a feed, what is shown around an item changes whether it is
examined and how attractive it looks. XPA lets each impression attend over the *other* shown items of
its request:
  relevance side: query = own relevance features, keys/values = the neighbours' features;
  bias side:      query = own position (row/column on a grid), keys = the neighbours' positions,
                  values = the neighbours' features and positions, so nearby items weigh most.
click logit = own relevance + own bias + both attended terms. Serving drops everything but relevance.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from models.ranking.data import RankBatch
from models.ranking.losses import logit_pair
from models.ranking.config import RankerConfig
from models.ranking.two_tower import TwoTowerRanker


def neighbour_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                        heads: int) -> torch.Tensor:
    """Multi-head attention of each item over the items it is allowed to see.

    q, k (R, L, A), v (R, L, A), allowed (R, L, L) bool (query i may attend to key j) → (R, L, A).
    An item with no allowed neighbour (a one-item list) gets zeros instead of NaN.
    """
    R, L, A = q.shape
    dh = A // heads
    q = q.view(R, L, heads, dh)                                           # (R, L, h, dh)
    k = k.view(R, L, heads, dh)                                           # (R, L, h, dh)
    v = v.view(R, L, heads, dh)                                           # (R, L, h, dh)
    scores = torch.einsum("rihd,rjhd->rhij", q, k) / math.sqrt(dh)        # (R, h, L, L)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))     # (R, h, L, L)
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)    # (R, h, L, L)
    return torch.einsum("rhij,rjhd->rihd", weights, v).reshape(R, L, A)   # (R, L, A)


class CrossPositional(TwoTowerRanker):
    def __init__(self, cfg: RankerConfig, tables: dict[str, np.ndarray] | None = None):
        super().__init__(cfg, tables)
        if cfg.xpa_dim % cfg.xpa_heads:
            raise ValueError(f"rank.xpa_dim must be a multiple of rank.xpa_heads "
                             f"(got {cfg.xpa_dim} and {cfg.xpa_heads})")
        h, e, a = self.relevance.out_hidden, self.bias.embed_dim, cfg.xpa_dim
        self.rel_q, self.rel_k, self.rel_v = nn.Linear(h, a), nn.Linear(h, a), nn.Linear(h, a)
        self.pos_q, self.pos_k, self.pos_v = nn.Linear(e, a), nn.Linear(e, a), nn.Linear(h + e, a)
        self.rel_out, self.pos_out = nn.Linear(a, 1), nn.Linear(a, 1)

    def click(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hid, rel = self.relevance(batch.user, batch.item, batch.logged_score)  # (R, L, H), (R, L, 1)
        emb = self.bias.embed(batch)                                           # (R, L, Eb)
        b = self.observation_dropout(self.bias.mlp(emb))                       # (R, L, 1)
        L = batch.mask.shape[1]
        others = ~torch.eye(L, dtype=torch.bool)                               # (L, L)
        allowed = batch.mask.unsqueeze(1) & batch.mask.unsqueeze(2) & others   # (R, L, L)
        heads = self.cfg.xpa_heads
        a_rel = neighbour_attention(self.rel_q(hid), self.rel_k(hid), self.rel_v(hid),
                                    allowed, heads)                            # (R, L, A)
        a_pos = neighbour_attention(self.pos_q(emb), self.pos_k(emb),
                                    self.pos_v(torch.cat([hid, emb], dim=-1)), allowed, heads)  # (R, L, A)
        z = rel + b + self.rel_out(a_rel) + self.pos_out(a_pos)                # (R, L, 1)
        return (*logit_pair(z.squeeze(-1)), self.adversary_loss(b, rel, batch.mask))
