"""The relevance tower: P(relevant | user, item), the part of every ranking model that serves.

It reads id embeddings (optional: rank.features_only), numeric item features and the retrieval towers'
user/item embeddings, never a position. Inputs are RankBatch tensors (models.ranking.data): user (R,),
item (R, L); index 0 is OOV or padding.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.ranking.config import TABLES, RankerConfig


def rows_of(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for an index tensor of any shape: (*index.shape, table columns). The same values as
    advanced indexing, read by index_select (a (128, 10) index into a 30k x 66 table: 50 against
    200 us on one thread; three such reads a step of every network)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


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
            return index * (torch.rand(index.shape, device=index.device) >= self.id_dropout)
        return index

    def _parts(self, user: torch.Tensor, item: torch.Tensor, logged_score: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """u (R, E) and uv (R, Du), one per request; i (R, L, E); and the other per-impression inputs
        the tower reads after them: numeric features, the item vector, their products with the user's."""
        uv = rows_of(self.user_vectors, user)                                # (R, Du)
        num = rows_of(self.item_numeric, item)                               # (R, L, Ni)
        iv = rows_of(self.item_vectors, item)                                # (R, L, Di)
        u = self.user_emb(self._id(user))                                    # (R, E)
        if self.user_proj is not None:
            u = u + self.user_proj(uv)                                       # (R, E)
        i = self.item_emb(self._id(item, self.ids))                          # (R, L, E)
        if self.item_proj is not None:
            i = i + self.item_proj(torch.cat([num, iv], dim=-1))             # (R, L, E)
        fixed = [num, iv]
        if self.paired:
            both = uv.unsqueeze(1) * iv                                      # (R, L, D)
            fixed += [both, both.sum(dim=-1, keepdim=True)]                  # (R, L, D), (R, L, 1)
        if self.use_logged_score:
            if logged_score is None:
                raise ValueError("this model reads the logged ranker score (use_logged_score); pass it")
            fixed.append(logged_score.unsqueeze(-1))                         # (R, L, 1)
        return u, uv, i, fixed

    def inputs(self, user: torch.Tensor, item: torch.Tensor,
               logged_score: torch.Tensor | None) -> torch.Tensor:
        """(R, L, in) what the first layer reads: [u, i, u ⊙ i, numeric, uv, iv, uv ⊙ iv, uv · iv,
        logged score], each request's u and uv repeated over its impressions."""
        u, uv, i, fixed = self._parts(user, item, logged_score)
        L = item.shape[1]
        u, uv = u.unsqueeze(1).expand(-1, L, -1), uv.unsqueeze(1).expand(-1, L, -1)
        num, rest = fixed[0], fixed[1:]
        return torch.cat([u, i, u * i, num, uv, *rest], dim=-1)

    def _first_layer(self, first: nn.Linear, user: torch.Tensor, item: torch.Tensor,
                     logged_score: torch.Tensor | None) -> torch.Tensor:
        """first(inputs(...)) computed by parts, the same sum in another order: what a request's
        user brings (u, uv) once per request instead of once per impression, and the inputs no
        gradient flows into (features, retrieval vectors) apart from the learned ones, so backward
        computes no gradient for them. On the 700k / 14M-log shape: 3.87 -> 3.42 ms a pal step."""
        u, uv, i, fixed = self._parts(user, item, logged_score)
        W, e = first.weight, u.shape[-1]                                     # (H, in)
        n_num = fixed[0].shape[-1]
        at_uv = 3 * e + n_num                                                # columns: u i ui num | uv | iv ...
        at_iv = at_uv + uv.shape[-1]
        per_request = F.linear(u, W[:, :e]) + F.linear(uv, W[:, at_uv:at_iv])              # (R, H)
        learned = F.linear(torch.cat([i, u.unsqueeze(1) * i], dim=-1), W[:, e:3 * e])    # (R, L, H)
        features = F.linear(torch.cat(fixed, dim=-1), torch.cat([W[:, 3 * e:at_uv], W[:, at_iv:]], dim=1),
                            first.bias)                                      # (R, L, H)
        return learned + features + per_request.unsqueeze(1)

    def hidden(self, user: torch.Tensor, item: torch.Tensor, logged_score: torch.Tensor | None) -> torch.Tensor:
        """(R, L, H) the body's output: body(inputs(...)), its first layer by parts."""
        if not isinstance(self.body, nn.Sequential):                         # no hidden layer
            return self.body(self.inputs(user, item, logged_score))
        layers, activation = self.body[0], self.body[1]                      # mlp(...), ReLU
        h = self._first_layer(layers[0], user, item, logged_score)
        return activation(layers[1:](h))

    # the last call's inputs and outputs while `reused` is open (else None)
    _last: tuple[tuple[torch.Tensor | None, ...], tuple[torch.Tensor, torch.Tensor]] | None = None
    _reusing = False

    @contextlib.contextmanager
    def reused(self) -> Iterator[None]:
        """Within: a call with the very tensors of the call before it returns that call's output. A
        counterfactual propensity curve moves each batch through every position (RankBatch.with_position
        keeps the same user, item and score tensors), and a position never changes the relevance: the
        tower then runs once per batch instead of once per position (11 times on a 10-slot page)."""
        self._reusing, self._last = True, None
        try:
            yield
        finally:
            self._reusing, self._last = False, None

    def forward(self, user: torch.Tensor, item: torch.Tensor,
                logged_score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        key = (user, item, logged_score)
        if self._reusing and self._last is not None and all(a is b for a, b in zip(self._last[0], key)):
            return self._last[1]
        h = self.hidden(user, item, logged_score)                            # (R, L, H)
        out = h, self.head(h)                                                # (R, L, H), (R, L, out)
        if self._reusing:      # holding the inputs keeps their identity: no other tensor can take it
            self._last = (key, out)
        return out
