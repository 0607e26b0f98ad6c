"""The smallest two-tower of the same sizes as ours: the yardstick of the training benchmark.

Item ids only on the item side; on the user side the mean of the user's history in the same item-id
table (YouTube DNN pooling); the same embedding, hidden and output sizes, the same batch size, Adam and
temperature; the loss is a plain in-batch softmax (no log Q, no accidental-hit mask, no SSL, no
features). The ratio of our examples/s to its examples/s on the same stream is what our extra parts
cost (train_bench.compare).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.stream import TrainingStream
from models.towers import Tower, TwoTowerConfig


class MinimalTwoTower(nn.Module):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.item_emb = nn.Embedding(cfg.n_items, cfg.embedding_dim, padding_idx=0)
        self.user_tower = Tower(cfg.embedding_dim, cfg.hidden, cfg.dim)
        self.item_tower = Tower(cfg.embedding_dim, cfg.hidden, cfg.dim)

    def forward(self, history: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.embedding_bag(history, self.item_emb.weight, mode="mean", padding_idx=0)   # (B, E)
        return self.user_tower(pooled), self.item_tower(self.item_emb(item))                  # (B, D), (B, D)


def minimal_fit(stream: TrainingStream, cfg: TwoTowerConfig, batch_size: int, lr: float, seed: int,
                epochs: int) -> tuple[list[float], list[float]]:
    """(seconds, mean loss) per epoch of the minimal model on the stream (the same batches as ours: a
    seeded permutation, slices of batch_size)."""
    torch.manual_seed(seed)
    model = MinimalTwoTower(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)   # as ours (models/optim.py)
    gen = torch.Generator().manual_seed(seed)
    history, items = stream.users["history"], stream.item_idx
    seconds, losses = [], []
    for _ in range(epochs):
        start_time, total = time.perf_counter(), 0.0
        perm = torch.randperm(len(stream), generator=gen)
        for start in range(0, len(perm), batch_size):
            b = perm[start:start + batch_size]                                      # (B,)
            q, c = model(history[b], items[b])
            logits = q @ c.T / cfg.temperature                                       # (B, B)
            loss = F.cross_entropy(logits, torch.arange(len(b)))
            value = float(loss.detach())        # the same per-step sync as ours (its NaN check)
            if not math.isfinite(value):
                raise RuntimeError("the minimal model's loss is not finite")
            total += value * len(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - start_time)
        losses.append(total / len(perm))
    return seconds, losses
