"""The served network as a seed ensemble: members of one kind trained on the same log from different
seeds, scored by the mean of their relevance scores (`rank.serve_ensemble`).

Clicks are few and noisy where a ranker is needed most (a new catalog, a small log): two fits of the
same model from two seeds then rank the unseen documents differently, and the mean of a few is better
than any one of them on average. `towerflow rank ltr-bench`, 10 sessions per query, random logger,
seeds 42-51, NDCG@10 of the held-out queries: served one fit 0.694, the mean of three 0.705, higher on
every seed (the gap from naive to label-trained closed: 48% -> 53%; docs/RANKING.md). Members share the
data and the config, so their scores are on one scale and a plain mean of logits is enough.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from models.ranking.config import TABLES, RankerConfig
from models.ranking.data import RankBatch
from models.ranking.ranker import Ranker


class SeedEnsemble(nn.Module):
    """Rankers of one kind and config: serving scores are the mean of the members' (position ignored)."""

    def __init__(self, members: Sequence[Ranker]):
        super().__init__()
        if not members:
            raise ValueError("a seed ensemble needs at least one member")
        kinds = {type(m) for m in members}
        if len(kinds) > 1 or any(m.cfg != members[0].cfg for m in members):
            raise ValueError("the members of a seed ensemble share one kind and config, got "
                             f"{sorted(k.__name__ for k in kinds)}")
        self.members = nn.ModuleList(members)
        self.cfg: RankerConfig = members[0].cfg
        first = members[0].relevance
        for m in members[1:]:    # one copy of equal feature tables: torch.save then writes it once
            for name in TABLES:
                if torch.equal(getattr(m.relevance, name), getattr(first, name)):
                    setattr(m.relevance, name, getattr(first, name))

    def ranking_scores(self, batch: RankBatch) -> torch.Tensor:
        """(R, L) the mean of the members' serving scores of every impression."""
        return torch.stack([m.ranking_scores(batch) for m in self.members]).mean(dim=0)

    def score(self, users: torch.Tensor, items: torch.Tensor,
              logged_score: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) the mean of the members' serving scores of (user, item) index pairs."""
        return torch.stack([m.score(users, items, logged_score) for m in self.members]).mean(dim=0)
