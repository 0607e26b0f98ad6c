"""Position-bias ranking models: towers → Ranker → click models: naive, two-tower (read top to bottom).

A click in a ranking log needs the user to examine the item (position, layout, device) and to find it
relevant (user × item). Every model here factorizes the click into a relevance tower (user and item
features) and, except the naive baseline, a bias tower (position and per-impression context), trains
both on the shown impressions, and serves with the relevance tower alone: `score(users, items)`.

Inputs are RankBatch tensors (models.ranking.data): user (R,), item/position/context (R, L[, C]).
Index 0 is OOV, padding or "missing" everywhere. The cross-positional attention model (xpa.py) and the
mixture of user types (mixture.py) build on the classes here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.ranking.catalog import RankFeatures
from models.ranking.data import RankBatch
from models.ranking.losses import bernoulli_nll, grad_reverse, log1mexp, logit_pair, masked_mean
from models.ranking.params import RankParams

TABLES = ("item_numeric", "user_vectors", "item_vectors")


@dataclass
class RankerConfig:
    n_users: int                         # user vocabulary size, index 0 = OOV
    n_items: int
    item_numeric: int                    # standardized numeric item features
    user_vector_dim: int                 # retrieval-tower user embedding size (0: none)
    item_vector_dim: int
    context_sizes: list[int] = field(default_factory=list)   # vocabulary size of each context column
    grid: bool = False                   # the bias tower reads grid row/col
    max_position: int = 50
    max_grid: int = 16
    embedding_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [64])
    bias_hidden: list[int] = field(default_factory=lambda: [16])
    vector_dim: int = 8
    use_logged_score: bool = False
    position_dropout: float = 0.1
    observation_dropout: float = 0.0
    grad_reversal: float = 0.0
    mixture_k: int = 2
    mixture_alpha: float = 1.0
    xpa_heads: int = 2
    xpa_dim: int = 16
    id_dropout: float = 0.0              # share of ids replaced by OOV in training
    ids: bool = True                     # item id embeddings at all (False: rank.features_only)

    @classmethod
    def build(cls, params: RankParams, features: RankFeatures, grid: bool, ids: bool | None = None) -> RankerConfig:
        """ids None: as rank.features_only says (auto, without the data to judge it by: ids on)."""
        # the architecture fields of the rank section; the rest (epochs, lr, ...) are for fit
        shared = {f.name for f in fields(cls)} & set(RankParams.model_fields)
        p = params.model_dump(include=shared)
        return cls(n_users=len(features.users), n_items=len(features.items),
                   ids=params.features_only is not True if ids is None else ids,
                   item_numeric=features.item_numeric.shape[1],
                   user_vector_dim=features.user_vectors.shape[1],
                   item_vector_dim=features.item_vectors.shape[1],
                   context_sizes=[len(features.contexts[c]) for c in params.context_columns],
                   grid=grid, **p)

    def to_dict(self) -> dict:
        return asdict(self)


def mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class RelevanceTower(nn.Module):
    """P(relevant | user, item): id embeddings, their elementwise product (matrix factorization inside
    the MLP's reach), numeric item features and the retrieval towers' embeddings (with their product
    and dot product when they share a size). Never sees a position."""

    item_numeric: torch.Tensor      # (I, Ni) buffers: feature tables indexed by vocabulary index
    user_vectors: torch.Tensor      # (U, Du)
    item_vectors: torch.Tensor      # (I, Di)

    def __init__(self, cfg: RankerConfig, out_dim: int, tables: dict[str, np.ndarray] | None = None):
        super().__init__()
        e = cfg.embedding_dim
        self.user_emb = nn.Embedding(cfg.n_users, e, padding_idx=0)   # OOV user: zero vector
        self.item_emb = nn.Embedding(cfg.n_items, e, padding_idx=0)
        for name, rows, cols in zip(TABLES, (cfg.n_items, cfg.n_users, cfg.n_items),
                                    (cfg.item_numeric, cfg.user_vector_dim, cfg.item_vector_dim)):
            value = torch.zeros(rows, cols) if tables is None else torch.as_tensor(tables[name])
            if tuple(value.shape) != (rows, cols):
                raise ValueError(f"feature table {name} must be ({rows}, {cols}), got {tuple(value.shape)}")
            self.register_buffer(name, value.to(torch.float32))   # saved with the model for serving
        # features projected into the id-embedding space, added to the id vector: a user or item the
        # logs never showed still gets a vector, and u ⊙ i then works like a factorization machine
        n_item_feat = cfg.item_numeric + cfg.item_vector_dim
        self.user_proj = nn.Linear(cfg.user_vector_dim, e, bias=False) if cfg.user_vector_dim else None
        self.item_proj = nn.Linear(n_item_feat, e, bias=False) if n_item_feat else None
        self.paired = cfg.user_vector_dim == cfg.item_vector_dim > 0
        in_dim = (3 * e + cfg.item_numeric + cfg.user_vector_dim + cfg.item_vector_dim
                  + (cfg.user_vector_dim + 1 if self.paired else 0) + int(cfg.use_logged_score))
        self.use_logged_score = cfg.use_logged_score
        self.ids, self.id_dropout = cfg.ids, cfg.id_dropout
        self.body = (nn.Sequential(mlp(in_dim, cfg.hidden[:-1], cfg.hidden[-1]), nn.ReLU())
                     if cfg.hidden else nn.Identity())
        self.out_hidden = cfg.hidden[-1] if cfg.hidden else in_dim
        self.head = nn.Linear(self.out_hidden, out_dim)
        # larger than nanoGPT's 0.02: u ⊙ i of two 0.02-scale vectors is ~4e-4 and barely learns
        for emb in (self.user_emb, self.item_emb):
            nn.init.normal_(emb.weight, std=0.1)
            with torch.no_grad():
                emb.weight[0].zero_()

    def forget(self, users_seen: np.ndarray, items_seen: np.ndarray) -> None:
        """Zero the id embeddings of users and items absent from training: they would otherwise keep
        their random initial vectors (noise) where the OOV row, which id dropout trained, is zero."""
        with torch.no_grad():
            for emb, seen in ((self.user_emb, users_seen), (self.item_emb, items_seen)):
                emb.weight[torch.from_numpy(~np.asarray(seen, dtype=bool))] = 0.0

    def _id(self, index: torch.Tensor, learned: bool = True) -> torch.Tensor:
        """The index the id embedding reads: OOV when ids are not learned, or for a dropped-out share in
        training (the feature tables still read the true index)."""
        if not learned:
            return torch.zeros_like(index)
        if self.training and self.id_dropout > 0:
            return index * (torch.rand(index.shape) >= self.id_dropout)
        return index

    def inputs(self, user: torch.Tensor, item: torch.Tensor,
               logged_score: torch.Tensor | None) -> torch.Tensor:
        L = item.shape[1]
        uv = self.user_vectors[user]                                         # (R, Du)
        num = self.item_numeric[item]                                        # (R, L, Ni)
        iv = self.item_vectors[item]                                         # (R, L, Di)
        u = self.user_emb(self._id(user))                                    # (R, E)
        if self.user_proj is not None:
            u = u + self.user_proj(uv)                                       # (R, E)
        u = u.unsqueeze(1).expand(-1, L, -1)                                 # (R, L, E)
        uv = uv.unsqueeze(1).expand(-1, L, -1)                               # (R, L, Du)
        i = self.item_emb(self._id(item, self.ids))                                  # (R, L, E)
        if self.item_proj is not None:
            i = i + self.item_proj(torch.cat([num, iv], dim=-1))             # (R, L, E)
        parts = [u, i, u * i, num, uv, iv]
        if self.paired:
            parts += [uv * iv, (uv * iv).sum(dim=-1, keepdim=True)]          # (R, L, D), (R, L, 1)
        if self.use_logged_score:
            if logged_score is None:
                raise ValueError("this model reads the logged ranker score (use_logged_score); pass it")
            parts.append(logged_score.unsqueeze(-1))                         # (R, L, 1)
        return torch.cat(parts, dim=-1)                                      # (R, L, in)

    def forward(self, user: torch.Tensor, item: torch.Tensor,
                logged_score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.inputs(user, item, logged_score))                 # (R, L, H)
        return h, self.head(h)                                               # (R, L, H), (R, L, out)


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
        idx = torch.zeros(1, dtype=torch.long)
        parts = [self.position(idx)] + [t(idx) for t in (self.row, self.col) if t is not None]
        parts += [t(idx) for t in self.context]
        return self.mlp(torch.cat(parts, dim=-1))[0]                         # (out,)


def standardize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(R, L, D) zero mean, unit variance per feature over the shown impressions of the batch."""
    m = mask.unsqueeze(-1).to(x.dtype)                                       # (R, L, 1)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum(dim=(0, 1)) / n                                       # (D,)
    var = (((x - mean) * m) ** 2).sum(dim=(0, 1)) / n                        # (D,)
    return (x - mean) / (var + 1e-6).sqrt()                                  # (R, L, D)


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
            drop = torch.rand(batch.mask.shape) < self.cfg.position_dropout             # (R, L)
        return self.observation_dropout(self.bias(batch, drop))                         # (R, L, out)

    def observation_dropout(self, b: torch.Tensor) -> torch.Tensor:
        """Zhang et al. 2023: zero the bias output of a share of impressions; there the relevance tower
        must explain the click alone, so relevance the bias tower took over through the logger's
        positions flows back. Not rescaled: the bias is a logit, and serving drops it anyway."""
        if not self.training or self.cfg.observation_dropout == 0:
            return b
        keep = torch.rand(b.shape[:-1] + (1,)) >= self.cfg.observation_dropout          # (R, L, 1)
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
