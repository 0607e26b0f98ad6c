"""The training loop: fit a TwoTower on a TrainingStream (models/stream.py) with BatchLoss
(models/objective.py).

Each epoch can end with a checkpoint (models/checkpoint.py), so a killed run resumes where it stopped
and ends with the same model as an uninterrupted one: every random draw comes from one
torch.Generator whose state is saved with the weights, the optimizer and the LR schedule.
The loop is the same for one process and for data-parallel ranks: a DistContext says which shard
of each epoch this process trains and how epoch figures are shared; the one-process context does
nothing. models/distributed.py provides the context of a rank and starts the ranks (it calls this
module, never the reverse).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from models.checkpoint import restore_checkpoint, save_checkpoint
from models.device import resolve_device
from models.early_stopping import ValidationTask
from models.encoding import FeatureEncoder
from models.errors import ModelError
from models.heap import retained_heap
from models.objective import BatchLoss, forget_unseen_items, make_augmenter
from models.optim import TowerOptimizer, TowerSchedule, make_optimizer, set_sparse, sparse_note, train_sparse_rows
from models.params import ModelParams, TrainParams
from models.stream import TrainingStream
from models.towers import TwoTower, TwoTowerConfig

# FitResult fields saved in a checkpoint: what a resumed run needs to go on where the last one stopped
PROGRESS_FIELDS = ("losses", "seconds", "val_ndcg", "best_epoch", "stopped_early")
Step = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def tower_config(encoder: FeatureEncoder, model_cfg: ModelParams) -> TwoTowerConfig:
    """The architecture implied by the fitted vocabularies and the model params."""
    return TwoTowerConfig(
        n_items=encoder.item_ids.size,
        n_users=encoder.user_ids.size,
        user_categorical=[v.size for v in encoder.users.categorical.values()],
        user_numeric=len(encoder.users.numeric),
        user_multi={c: v.size for c, v in encoder.users.multi.items()},
        item_categorical=[v.size for v in encoder.items.categorical.values()],
        item_numeric=len(encoder.items.numeric),
        item_multi={c: v.size for c, v in encoder.items.multi.items()},
        embedding_dim=model_cfg.embedding_dim,
        hidden=list(model_cfg.hidden),
        dim=model_cfg.dim,
        user_id_embedding=model_cfg.user_id_embedding,
        temperature=model_cfg.temperature,
        learn_temperature=model_cfg.learn_temperature,
    )


class DistContext:
    """How this process takes part in training: one process (this class, every method a no-op) or
    one rank of a data-parallel group (models.distributed.GroupContext)."""

    rank, world = 0, 1

    @property
    def lead(self) -> bool:
        """The process that validates, logs and writes checkpoints."""
        return self.rank == 0

    def shard(self, perm: torch.Tensor) -> torch.Tensor:
        """This process's part of an epoch's permutation."""
        return perm

    def sampler(self, seed: int, epoch: int, gen: torch.Generator) -> torch.Generator:
        """The generator of this epoch's negatives and SSL items: one process draws them from the
        run's generator."""
        return gen

    def step(self, model: TwoTower, batch_loss: BatchLoss) -> Step:
        """loss(batch rows, generator) for the optimizer step."""
        return lambda b, gen: batch_loss(model, b, gen)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        return list(values)

    def broadcast(self, values: list[Any]) -> list[Any]:
        """The lead process's values on every process."""
        return values


@dataclass
class FitResult:
    model: TwoTower
    losses: list[float] = field(default_factory=list)      # mean loss per epoch
    seconds: list[float] = field(default_factory=list)     # wall time per epoch
    val_ndcg: list[float] = field(default_factory=list)    # validation NDCG@20 per epoch (early stopping)
    best_epoch: int | None = None                          # 1-based epoch of the best validation NDCG
    stopped_early: bool = False
    resumed_from: int = 0                                  # epochs restored from a checkpoint
    notes: list[str] = field(default_factory=list)

    def progress(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PROGRESS_FIELDS}

    def summary(self, n_examples: int) -> dict:
        total = sum(self.seconds)
        out: dict[str, Any] = {
            "final_loss": round(self.losses[-1], 6) if self.losses else None,
            "examples": n_examples,
            "epochs": len(self.losses),
            "seconds_per_epoch": round(total / max(len(self.seconds), 1), 3),
            "examples_per_s": round(n_examples * len(self.seconds) / total, 1) if total > 0 else None,
        }
        if self.val_ndcg:
            out |= {"val_ndcg@20": [round(v, 6) for v in self.val_ndcg], "best_epoch": self.best_epoch,
                    "stopped_early": self.stopped_early}
        if self.resumed_from:
            out["resumed_from_epoch"] = self.resumed_from
        if self.model.log_tau is not None:
            out["learned_temperature"] = round(float(self.model.tau().detach()), 5)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def lr_factor(train_cfg: TrainParams, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step t: constant, or cosine decay to 10% over train_cfg.epochs."""
    total = max(train_cfg.epochs * steps_per_epoch, 1)
    if train_cfg.lr_schedule == "constant":
        return lambda t: 1.0
    return lambda t: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


def training_device(train_cfg: TrainParams, dist: DistContext) -> torch.device:
    """train.device resolved on this machine; a data-parallel rank takes GPU rank % GPUs (its gloo
    all-reduce then runs on CUDA tensors)."""
    device = resolve_device(train_cfg.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.rank % torch.cuda.device_count())
    return device


def check_stream(stream: TrainingStream) -> None:
    if len(stream) == 0:
        raise ValueError("the training stream is empty: nothing to train on")


def _validate_epoch(result: FitResult, validation: ValidationTask, stream: TrainingStream,
                    train_cfg: TrainParams, dist: DistContext) -> str:
    """Record this epoch's validation NDCG@20 and the early-stopping decision (the lead process
    measures, every process gets its decision); returns the text for the epoch's log line."""
    line = ""
    if dist.lead:
        result.val_ndcg.append(validation.ndcg(result.model, stream.items))
        best = int(np.argmax(result.val_ndcg))      # first best: ties keep the shorter run
        result.best_epoch = best + 1
        epoch = len(result.losses)
        result.stopped_early = train_cfg.early_stopping and epoch - result.best_epoch >= train_cfg.patience
        line = f" val ndcg@20 {result.val_ndcg[-1]:.4f} (best {result.best_epoch})"
    # every process must stop at the same epoch, or the others wait forever
    result.val_ndcg, result.best_epoch, result.stopped_early = dist.broadcast(
        [result.val_ndcg, result.best_epoch, result.stopped_early])
    return line


def _train_epoch(step: Step, perm: torch.Tensor, sampler: torch.Generator, opt: TowerOptimizer,
                 sched: TowerSchedule, batch_size: int, epoch: int) -> tuple[float, int]:
    """One pass over `perm` in batches; returns (sum of batch loss × batch size, examples seen).
    Stops at the first non-finite loss, before its update reaches the weights (see `_finite`)."""
    total, seen = 0.0, 0
    n_steps = math.ceil(len(perm) / batch_size)
    for i, start in enumerate(range(0, len(perm), batch_size)):
        b = perm[start:start + batch_size]                              # (B,)
        loss = step(b, sampler)
        value = float(loss.detach())
        _finite(value, epoch, i + 1, n_steps, sched.last_epoch + 1)
        opt.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            sched.step()
        total += value * len(b)
        seen += len(b)
    return total, seen


def _finite(loss: float, epoch: int, step: int, n_steps: int, global_step: int) -> None:
    """A NaN/inf loss poisons every weight at the next update, and the run would go on for all its
    epochs to publish a model that scores NaN: stop at the first one and say where."""
    if not math.isfinite(loss):
        raise ModelError(f"training loss became {loss} at epoch {epoch}, step {step} of {n_steps} (optimizer "
                         f"step {global_step}), stopped before its update: lower train.lr "
                         "(or use train.lr_schedule: cosine), or look for extreme values in the numeric features")


def fit(stream: TrainingStream, tower_cfg: TwoTowerConfig, train_cfg: TrainParams, seed: int,
        epochs: int | None = None, validation: ValidationTask | None = None,
        checkpoint: Path | None = None, log: Callable[[str], None] | None = None,
        on_epoch: Callable[[int], None] | None = None, dist: DistContext | None = None) -> FitResult:
    """Train for `epochs` (default train_cfg.epochs) in this process. With `validation` and
    train_cfg.early_stopping, stop after train_cfg.patience epochs without a better validation NDCG@20.
    `checkpoint`: a file written after every epoch and resumed from when it exists. `on_epoch(epoch)`
    runs after each checkpoint. Same inputs + seed → same model, whether or not the run was
    interrupted and resumed.

    `dist` (default: one process) is this process's part in a data-parallel run: it trains its
    rank's shard, and only the lead rank logs, validates and writes the checkpoint. To train with
    train_cfg.workers processes, call models.distributed.spawn_fit."""
    check_stream(stream)
    dist = dist or DistContext()
    if dist.world == 1 and train_cfg.workers > 1:
        raise ValueError(f"train.workers={train_cfg.workers}: fit trains in one process; start the workers "
                         "with models.distributed.spawn_fit")
    epochs = epochs or train_cfg.epochs
    device = training_device(train_cfg, dist)
    torch.manual_seed(seed)
    model = TwoTower(tower_cfg).to(device)     # initialized on the CPU generator: the same weights anywhere
    if train_cfg.item_id_dropout > 0:
        # items without a positive start as unknown ids and stay so (a warm start below overwrites them)
        forget_unseen_items(model, stream.counts)
    n = len(stream)
    steps = math.ceil(math.ceil(n / dist.world) / train_cfg.batch_size)
    opt, sched = make_optimizer(model, train_cfg, lr_factor(train_cfg, steps))
    gen = torch.Generator().manual_seed(seed)       # the permutation: the same on every rank
    result = FitResult(model=model)
    if (note := sparse_note(train_cfg.sparse_min_rows, train_cfg.weight_decay, train_cfg.compile)) is not None:
        result.notes.append(note)
    if opt.sparse_tables:
        result.notes.append(f"{opt.sparse_tables} embedding table(s) of >= {train_sparse_rows(train_cfg)} rows on sparse "
                            "gradients (SparseAdam)")
    batch_loss = BatchLoss(stream, train_cfg, make_augmenter(stream, train_cfg, result.notes), device=device,
                           mixed_precision=train_cfg.mixed_precision, compile=train_cfg.compile)
    if train_cfg.negatives and batch_loss.n_hard == 0 and train_cfg.hard_ratio > 0:
        result.notes.append("no hard negatives in the stream (ranking logs empty or none before the examples)")
    if checkpoint is not None and checkpoint.exists():
        for name, value in restore_checkpoint(checkpoint, model, opt, sched, gen, PROGRESS_FIELDS).items():
            setattr(result, name, value)
        result.resumed_from = len(result.losses)
    step = dist.step(model, batch_loss)     # after the restore: a DDP wrapper copies rank 0's weights
    with retained_heap():                   # each step reuses the last one's memory (models/heap.py)
        while len(result.losses) < epochs and not result.stopped_early:
            model.train()
            start_time = time.perf_counter()
            perm = dist.shard(torch.randperm(n, generator=gen))
            # ranks draw their own negatives and SSL items (models/distributed.py says how)
            sampler = dist.sampler(seed, len(result.losses), gen)
            total, seen = dist.sum(*_train_epoch(step, perm, sampler, opt, sched, train_cfg.batch_size,
                                                 epoch=len(result.losses) + 1))
            result.losses.append(total / seen)
            result.seconds.append(time.perf_counter() - start_time)
            epoch = len(result.losses)
            line = f"epoch {epoch}/{epochs} loss {result.losses[-1]:.4f} {result.seconds[-1]:.1f} s " \
                   f"({n / result.seconds[-1]:.0f} examples/s)"
            if validation is not None:
                line += _validate_epoch(result, validation, stream, train_cfg, dist)
            if dist.lead and log is not None:
                log(line)
            if dist.lead and checkpoint is not None:
                save_checkpoint(checkpoint, model, opt, sched, gen, result.progress())
            if dist.lead and on_epoch is not None:
                on_epoch(epoch)
    # the trained model leaves on the CPU, its tables dense: saving, publishing and the callers'
    # scoring are device-free
    set_sparse(model, None)
    result.model = model.cpu().eval()
    return result
