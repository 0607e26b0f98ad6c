"""The bias tower: P(examined | position, layout, context), trained beside the relevance tower and
dropped at serving (serving scores at "unknown position"). It never sees the user or the item.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.ranking.config import RankerConfig
from models.ranking.data import RankBatch
from models.ranking.relevance import mlp


class BiasTower(nn.Module):
    """P(examined | position, layout, context): embeddings of the position (0 = unknown), grid row and
    column, and each context column, through a small MLP. Never sees the user or the item."""

    def __init__(self, cfg: RankerConfig, out_dim: int):
        super().__init__()
        e = cfg.embedding_dim
        self.position = nn.Embedding(cfg.max_position + 1, e)
        self.row = nn.Embedding(cfg.max_grid + 1, e) if cfg.grid else None
        self.col = nn.Embedding(cfg.max_grid + 1, e) if cfg.grid else None
        self.context = nn.ModuleList(nn.Embedding(n, e) for n in cfg.context_sizes)
        self.embed_dim = e * (1 + 2 * int(cfg.grid) + len(cfg.context_sizes))
        self.mlp = mlp(self.embed_dim, cfg.bias_hidden, out_dim)

    def embed(self, batch: RankBatch, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(R, L, Eb); where drop (R, L) is True every input reads as unknown (index 0)."""
        keep = torch.ones_like(batch.mask) if drop is None else ~drop        # (R, L)
        parts = [self.position(batch.position * keep)]                       # (R, L, E)
        if self.row is not None and self.col is not None:
            if batch.row is None or batch.col is None:
                raise ValueError("this model was built for a grid layout: the batch has no row/col")
            parts += [self.row(batch.row * keep), self.col(batch.col * keep)]
        parts += [t(batch.context[..., j] * keep) for j, t in enumerate(self.context)]
        return torch.cat(parts, dim=-1)                                      # (R, L, Eb)

    def forward(self, batch: RankBatch, drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.embed(batch, drop))                             # (R, L, out)

    def unknown(self) -> torch.Tensor:
        """(out,) the tower's output when nothing about the impression is known (serving)."""
        idx = torch.zeros(1, dtype=torch.long, device=self.position.weight.device)
        parts = [self.position(idx)] + [t(idx) for t in (self.row, self.col) if t is not None]
        parts += [t(idx) for t in self.context]
        return self.mlp(torch.cat(parts, dim=-1))[0]                         # (out,)


def relative_examination(tower: BiasTower, batch: RankBatch, positions: list[int]) -> torch.Tensor:
    """(P,) examination at each position relative to position 1 for a tower whose output is an
    examination logit compared by a softmax over the list (the listwise models: Mixture-EM's
    components, the dual learning algorithm): exp(b(p) − b(1)), averaged over the batch's shown
    impressions (their context)."""
    with torch.no_grad():
        top = tower(batch.with_position(1)).squeeze(-1)                              # (R, L)
        at = torch.stack([tower(batch.with_position(p)).squeeze(-1) - top for p in positions])  # (P, R, L)
        return (at.exp() * batch.mask).sum(dim=(1, 2)) / batch.mask.sum().clamp(min=1)          # (P,)
