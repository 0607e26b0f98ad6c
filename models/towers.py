"""The two-tower retrieval model: encoders → Tower → TwoTower (read top to bottom, nanoGPT style).

Inputs are dicts of tensors produced by models.encoding.FeatureEncoder:
  items: 'item' (B,), 'cat' (B, Ci), 'num' (B, Ni), 'multi:<col>' (B, L)
  users: 'user' (B,), 'history' (B, H) item indices newest first, 'cat' (B, Cu), 'num' (B, Nu), 'multi:<col>'
Index 0 is OOV/padding everywhere. The user tower pools the *same* item-id embedding table that the
item tower uses, so a user's history lives in the space the items are learned in (YouTube DNN, Covington
et al. 2016, averaged watch embeddings). The model returns the two L2-normalized embeddings; the loss
(models.losses) and the index (publish) live elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


# a learned temperature below this makes the logits explode (cosine scores are in [-1, 1])
MIN_TAU = 0.01


@dataclass
class TwoTowerConfig:
    n_items: int                      # item-id vocabulary size, index 0 = OOV/padding
    n_users: int                      # user-id vocabulary size (used only with user_id_embedding)
    user_categorical: list[int]       # vocabulary size of each user categorical column
    user_numeric: int                 # number of standardized user numeric columns
    user_multi: dict[str, int]        # multi-valued user column -> vocabulary size
    item_categorical: list[int]
    item_numeric: int
    item_multi: dict[str, int]
    embedding_dim: int = 64
    hidden: list[int] = field(default_factory=lambda: [128])
    dim: int = 64
    user_id_embedding: bool = False
    temperature: float = 0.07         # softmax temperature, or its starting value when learned
    learn_temperature: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def rows_in_order(flat: torch.Tensor) -> torch.Tensor:
    """The positions of `flat` (1-D, values in [0, 2**32)) sorted by value, equal values in their order:
    numpy's stable argsort is a radix sort on 16-bit keys, so one pass over the low 16 bits and one over
    the high ones (only when a value needs them). torch's sort took ~1.8 ms for a demo batch's 40,000
    history entries against 0.13-0.34 ms here, at any catalog size (docs/TRAINING.md)."""
    f = flat.numpy()
    order = np.argsort((f & 0xFFFF).astype(np.uint16), kind="stable")
    if f.size and int(f.max()) > 0xFFFF:
        order = order[np.argsort((f[order] >> 16).astype(np.uint16), kind="stable")]
    return torch.from_numpy(order)


class _BagSum(torch.autograd.Function):
    """Sum of the rows `flat` of `weight` per bag (`bag[i]` is the bag of `flat[i]`, bags in order from
    `offsets`): embedding_bag's forward, and a backward that is the same sum the other way round: the
    entries put in row order (rows_in_order, a radix sort), each row's gradient is the sum of its
    entries' bag gradients, one embedding_bag over the (B, E) output gradient. torch's dense
    embedding_bag backward sorts with a slower sort first (3.0 ms forward + backward of the demo's 1,024
    histories); index_add_, the last version, was 1.4-2.0 ms for the backward alone against ~0.6 now
    (docs/TRAINING.md). A stable sort and embedding_bag's in-order sums: repeated runs give the same bits."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, flat: torch.Tensor, offsets: torch.Tensor,
                bag: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
        ctx.save_for_backward(flat, bag)
        ctx.rows, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding_bag(flat, weight, offsets, mode="sum")                 # (B, E)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, bag = ctx.saved_tensors
        counts = torch.bincount(flat, minlength=ctx.rows)                           # (rows,) entries per row
        by_row = bag[rows_in_order(flat)]                                           # bag of each entry, row order
        grad_weight = F.embedding_bag(by_row, grad.contiguous(), counts.cumsum(0) - counts, mode="sum")
        if ctx.padding_idx is not None:
            grad_weight[ctx.padding_idx] = 0                 # as nn.Embedding's padding_idx: that row never learns
        return grad_weight, None, None, None, None                                  # (rows, E)


def masked_mean(emb: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """Mean of the embeddings of the non-zero indices of each row; all-padding rows give zeros."""
    # embedding_bag pools without materializing (B, L, E); a table marked sparse (models/optim.py) gets a
    # sparse gradient here too. The padding is dropped first and the bags summed, then divided: the same
    # mean as mode="mean" with padding_idx=0, whose backward cost 2x to 3x as much (demo histories, 1,024
    # x 50 indices, 2 threads: 10.6 against 6.1 ms forward + backward with 1,683 items, 15.8 against
    # 7.1 ms with 30,000; docs/TRAINING.md); a dense table's gradient comes from _BagSum. On a GPU,
    # selecting the kept values would make the host wait for the device at every call (a boolean index
    # needs its count), and that kernel was never measured slow: there embedding_bag takes the mean itself
    if idx.device.type != "cpu":
        return F.embedding_bag(idx, emb.weight, mode="mean", padding_idx=0, sparse=emb.sparse)  # (B, E)
    if not emb.sparse:
        return shared_lookups(emb, [], [idx])[1][0]
    bag, col = (idx != 0).nonzero(as_tuple=True)                         # kept entries, row-major
    counts = torch.bincount(bag, minlength=idx.shape[0])                  # (B,)
    pooled = F.embedding_bag(idx[bag, col], emb.weight, counts.cumsum(0) - counts, mode="sum", sparse=True)
    return pooled / counts.clamp(min=1).unsqueeze(1).to(pooled.dtype)    # (B, E)


def shared_lookups(emb: nn.Embedding, ids: list[torch.Tensor],
                   histories: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """emb's rows for each (n,) tensor of `ids` (as emb(ids) gives them) and the masked_mean of each
    (B, H) index matrix of `histories`, all through one _BagSum: a dense table read in several places
    of a step (the item-id table: the batch's items, the SSL views' items, the users' histories) gets
    one gradient instead of one per read. Each read's own gradient was a fresh (rows, E) tensor, filled
    with zeros and then added to the others: with 30,000 items, two fills and two adds of 7.7 MB were
    ~6 ms of a 38 ms step on one thread (docs/TRAINING.md). The values are emb's, bit for bit (a bag of
    one row is that row; the histories are summed in masked_mean's order); the gradient is the same
    sum in another order. A dense table on the CPU only: a sparse or GPU table reads as before."""
    flats, bags, counts, start = [], [], [], 0
    for x in ids:                                                   # one bag per id, the id included
        n = len(x)
        flats.append(x)
        bags.append(torch.arange(start, start + n))
        counts.append(torch.ones(n, dtype=torch.long))
        start += n
    for h in histories:                                             # one bag per row, padding dropped
        bag, col = (h != 0).nonzero(as_tuple=True)
        flats.append(h[bag, col])
        bags.append(bag + start)
        counts.append(torch.bincount(bag, minlength=h.shape[0]))
        start += h.shape[0]
    count = torch.cat(counts)
    pooled = _BagSum.apply(emb.weight, torch.cat(flats), count.cumsum(0) - count, torch.cat(bags),
                           emb.padding_idx)                                         # (start, E)
    parts = pooled.split([len(x) for x in ids] + [h.shape[0] for h in histories])
    means = [p / c.clamp(min=1).unsqueeze(1).to(p.dtype) for p, c in zip(parts[len(ids):], counts[len(ids):])]
    return list(parts[:len(ids)]), means


class CategoricalEncoder(nn.Module):
    """One embedding per categorical column, concatenated. Index 0 (OOV/null) has its own vector."""

    def __init__(self, sizes: list[int], dim: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in sizes)
        self.out_dim = dim * len(sizes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:        # idx (B, C)
        if not self.tables:
            return idx.new_zeros((idx.shape[0], 0), dtype=torch.float32)
        return torch.cat([t(idx[:, j]) for j, t in enumerate(self.tables)], dim=-1)  # (B, C*E)


class MultiEncoder(nn.Module):
    """Mean-pooled embedding of each multi-valued column (e.g. genres), concatenated."""

    def __init__(self, sizes: dict[str, int], dim: int):
        super().__init__()
        self.names = list(sizes)
        self.tables = nn.ModuleList(nn.Embedding(n, dim, padding_idx=0) for n in sizes.values())
        self.out_dim = dim * len(sizes)

    def forward(self, batch: Batch) -> list[torch.Tensor]:
        return [masked_mean(t, batch[f"multi:{c}"]) for c, t in zip(self.names, self.tables)]  # [(B, E)]


class Tower(nn.Module):
    """Concatenated input features → MLP (ReLU) → linear projection → L2 norm."""

    def __init__(self, in_dim: int, hidden: list[int], dim: int):
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"a tower needs at least one input feature (got in_dim={in_dim})")
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        layers.append(nn.Linear(in_dim, dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x (B, in_dim)
        return F.normalize(self.mlp(x), dim=-1)                  # (B, D)


class TwoTower(nn.Module):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        if cfg.n_items < 2:
            raise ValueError(f"item vocabulary is empty (n_items={cfg.n_items}): check items.parquet")
        if cfg.temperature <= 0:
            raise ValueError(f"model.temperature must be > 0 (got {cfg.temperature})")
        self.cfg = cfg
        e = cfg.embedding_dim
        # shared by the item tower (the item's own id) and the user tower (its history)
        self.item_emb = nn.Embedding(cfg.n_items, e, padding_idx=0)
        self.item_cat = CategoricalEncoder(cfg.item_categorical, e)
        self.item_multi = MultiEncoder(cfg.item_multi, e)
        self.user_cat = CategoricalEncoder(cfg.user_categorical, e)
        self.user_multi = MultiEncoder(cfg.user_multi, e)
        self.user_emb = nn.Embedding(cfg.n_users, e) if cfg.user_id_embedding else None
        item_in = e + self.item_cat.out_dim + cfg.item_numeric + self.item_multi.out_dim
        # + 1: log history length, so the tower can tell an empty history from an average one
        user_in = (e + 1 + self.user_cat.out_dim + cfg.user_numeric + self.user_multi.out_dim
                   + (e if cfg.user_id_embedding else 0))
        self.item_tower = Tower(item_in, cfg.hidden, cfg.dim)
        self.user_tower = Tower(user_in, cfg.hidden, cfg.dim)
        # learned in log space (stays positive); scoring at serving is a dot product, so only the
        # training loss reads it
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.temperature))) if cfg.learn_temperature else None
        self.apply(self._init_weights)

    def tau(self) -> torch.Tensor | float:
        """The softmax temperature of the retrieval loss; a learned one is kept >= MIN_TAU."""
        if self.log_tau is None:
            return self.cfg.temperature
        return self.log_tau.exp().clamp(min=MIN_TAU)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # small embeddings (nanoGPT's 0.02) keep the MLP inputs on the scale of standardized numerics
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def encode_items(self, batch: Batch, item_rows: torch.Tensor | None = None) -> torch.Tensor:
        """item_rows (B, E): the items' id embeddings when read already (shared_lookups)."""
        parts = [self.item_emb(batch["item"]) if item_rows is None else item_rows,   # (B, E)
                 self.item_cat(batch["cat"]),                   # (B, Ci*E)
                 batch["num"],                                  # (B, Ni)
                 *self.item_multi(batch)]                       # [(B, E)]
        return self.item_tower(torch.cat(parts, dim=-1))        # (B, D)

    def encode_users(self, batch: Batch, history_mean: torch.Tensor | None = None) -> torch.Tensor:
        """history_mean (B, E): the pooled histories when read already (shared_lookups)."""
        history = batch["history"]                              # (B, H)
        n_hist = (history != 0).sum(dim=1, keepdim=True)        # (B, 1)
        pooled = masked_mean(self.item_emb, history) if history_mean is None else history_mean
        parts = [pooled,                                        # (B, E)
                 torch.log1p(n_hist.to(torch.float32)),         # (B, 1)
                 self.user_cat(batch["cat"]),                   # (B, Cu*E)
                 batch["num"],                                  # (B, Nu)
                 *self.user_multi(batch)]                       # [(B, E)]
        if self.user_emb is not None:
            parts.append(self.user_emb(batch["user"]))          # (B, E)
        return self.user_tower(torch.cat(parts, dim=-1))        # (B, D)

    def forward(self, users: Batch, items: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_users(users), self.encode_items(items)  # (B, D), (B, D)
