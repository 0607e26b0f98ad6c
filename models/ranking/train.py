"""Build a ranking model by name and fit it on request batches (CPU, deterministic for a seed)."""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Protocol

import numpy as np
import torch

from models.device import resolve_device
from models.optim import TowerOptimizer, TowerSchedule, set_sparse, sparse_min_rows, sparse_note
from models.ranking.catalog import RankFeatures
from models.ranking.data import RankBatch
from models.ranking.dla import DualLearning
from models.ranking.mixture import MixtureEM
from models.ranking.params import RankParams
from models.ranking.config import TABLES, RankerConfig
from models.ranking.ranker import Naive, Ranker
from models.ranking.two_tower import PAL, Additive, DotProduct
from models.ranking.xpa import CrossPositional

# `rank.sparse_min_rows: auto`. A step of 128 requests x 10 shown items reads ~1,400 id rows; ms per step on
# 2 threads, dense Adam / sparse + SparseAdam (naive): 944 users + 1,683 items 3.8 / 4.0, 40k + 40k 37.8 /
# 22.2, 70k + 14k 14.9 / 9.7, 1M + 200k 140 / 4.9 (docs/RANKING.md)
RANK_SPARSE_AUTO_ROWS = 20_000

MODELS: dict[str, Callable[..., Ranker]] = {
    "naive": Naive,
    "pal": PAL,
    "additive": Additive,
    "dot": DotProduct,
    "bilinear": partial(DotProduct, bilinear=True),
    "mixture": MixtureEM,
    "xpa": CrossPositional,
    "dla": DualLearning,
}


def feature_tables(features: RankFeatures) -> dict[str, np.ndarray]:
    return {name: getattr(features, name) for name in TABLES}


def build_model(name: str, cfg: RankerConfig, features: RankFeatures | None, seed: int) -> Ranker:
    """A fresh model; the same seed gives the same initial weights. features=None: zero feature
    tables of the configured shapes (to load a saved state_dict into)."""
    if name not in MODELS:
        raise ValueError(f"unknown ranking model {name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name](cfg, None if features is None else feature_tables(features))


class Batches(Protocol):
    """What fit trains on: re-iterable, and its length is known before the first pass (a list, or a
    RankingLog that counts its requests) so the lr schedule knows where training ends."""

    def __iter__(self) -> Iterator[RankBatch]: ...

    def __len__(self) -> int: ...


@dataclass
class FitReport:
    epochs: int
    examples: int                        # shown impressions seen, all epochs together
    seconds: float
    examples_per_s: float
    lr: float                            # the base learning rate it trained at (rank.lr; dla: rank.dla_lr)
    losses: list[float] = field(default_factory=list)   # mean training loss per epoch
    valid_losses: list[float] = field(default_factory=list)   # mean validation loss per epoch (early stopping)
    best_epoch: int | None = None        # the epoch whose weights were kept (1-based; None: the last)
    sparse_tables: int = 0               # id tables trained on sparse gradients (rank.sparse_min_rows)
    note: str | None = None              # why they stayed dense although asked for
    epochs_cut: str | None = None        # why fewer epochs than rank.epochs ran (rank.max_steps)

    def to_dict(self) -> dict:
        return asdict(self)


def shuffled(batches: Iterable[RankBatch], rng: random.Random, buffer: int) -> Iterator[RankBatch]:
    """Batches in a random order within windows of `buffer` batches: a stream is never held whole."""
    window: list[RankBatch] = []
    for batch in batches:
        window.append(batch)
        if len(window) >= buffer:
            yield window.pop(rng.randrange(len(window)))
    rng.shuffle(window)
    yield from window


def validation_loss(model: Ranker, batches: Iterable[RankBatch], device: torch.device | None = None) -> float:
    """Mean loss per batch on held-out requests, without the training-time dropouts."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [float(model.loss(b.to(device))) for b in batches]
    model.train(was_training)
    return sum(losses) / len(losses) if losses else float("nan")


def decay_at_end(total_steps: int, share: float) -> Callable[[int], float]:
    """Multiplier of the lr at step t: 1, then falling linearly to 0 over the last `share` of the steps
    (a warmup-stable-decay schedule without the warmup)."""
    start = total_steps * (1.0 - share)
    return lambda t: 1.0 if t < start else max(0.0, (total_steps - t) / max(total_steps - start, 1.0))


def epochs_within(epochs: int, max_steps: int | None, steps_per_epoch: int) -> int:
    """The whole epochs that fit in max_steps optimizer steps (None: no limit), at least one."""
    if max_steps is None or steps_per_epoch == 0:
        return epochs
    return max(1, min(epochs, max_steps // steps_per_epoch))


def fit(model: Ranker, batches: Batches, cfg: RankParams, seed: int,
        valid: Iterable[RankBatch] | None = None) -> FitReport:
    """Adam over `cfg.epochs` passes of `batches` (re-iterable: a list, or a RankingLog that re-reads
    its file), the lr falling to 0 over the last `cfg.lr_decay` of the steps; id tables of at least
    rank.sparse_min_rows rows on sparse gradients and SparseAdam.
    A log whose rank.epochs passes would take more than rank.max_steps steps gets fewer whole passes
    (at least one): on a large log the later passes cost the most and bring the least (the click loss
    on held-out requests got worse, not better; docs/RANKING.md "Epochs on a large log").
    Seeds torch (dropouts) and the batch order, so a seed gives the same model. With
    `valid` (held-out requests): early stopping on their loss, `cfg.patience` epochs without a better
    one end training, and the best epoch's weights are kept."""
    device = resolve_device(cfg.device, "rank.device")   # before anything is trained: `cuda` without a GPU says so
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.to(device)
    opt = TowerOptimizer(model, cfg.lr, cfg.weight_decay, sparse_min_rows(cfg.sparse_min_rows, cfg.weight_decay,
                                                                            auto_rows=RANK_SPARSE_AUTO_ROWS))
    steps = len(batches)
    epochs = epochs_within(cfg.epochs, cfg.max_steps, steps)
    sched = TowerSchedule(opt, decay_at_end(epochs * steps, cfg.lr_decay))
    model.train()
    examples, losses, stop = 0, [], _EarlyStop(cfg.patience)
    started = time.perf_counter()
    for _ in range(epochs):
        total, n = 0.0, 0
        for batch in shuffled(batches, rng, cfg.shuffle_buffer):
            loss = model.loss(batch.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item(), n + 1
            examples += batch.n_examples
        losses.append(total / max(n, 1))
        if valid is not None and stop.done(model, validation_loss(model, valid, device)):
            break
    stop.restore(model)
    set_sparse(model, None)  # dense again: scored, evaluated and saved on the CPU as any model
    model.cpu().eval()
    seconds = time.perf_counter() - started
    return FitReport(epochs=len(losses), examples=examples, seconds=round(seconds, 3),
                     examples_per_s=round(examples / max(seconds, 1e-9), 1), lr=cfg.lr, losses=losses,
                     valid_losses=stop.losses, best_epoch=stop.best_epoch, sparse_tables=opt.sparse_tables,
                     note=sparse_note(cfg.sparse_min_rows, cfg.weight_decay),
                     epochs_cut=(f"{epochs} of rank.epochs {cfg.epochs}: {steps} steps an epoch, rank.max_steps "
                                 f"{cfg.max_steps}" if epochs < cfg.epochs else None))


class _EarlyStop:
    """Keeps the weights of the epoch with the lowest validation loss; done after `patience` worse ones."""

    def __init__(self, patience: int):
        self.patience, self.losses = patience, []
        self.best_epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def done(self, model: Ranker, loss: float) -> bool:
        self.losses.append(loss)
        if loss != loss:      # NaN: no validation request (a small log, or few users held out): train on
            return False
        if self.best_epoch is None or loss < self.losses[self.best_epoch - 1]:
            self.best_epoch = len(self.losses)
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return len(self.losses) - self.best_epoch >= self.patience

    def restore(self, model: Ranker) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)
