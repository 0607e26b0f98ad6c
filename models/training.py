"""Fit a TwoTower on a sampled positive stream, and save it with its encoder.

The whole stream is encoded into tensors once; a batch is a slice of a seeded permutation, and the
item side of a batch is a gather from the pre-encoded catalog, so there is no per-example Python work.
Each epoch can end with a checkpoint, so a killed run resumes where it stopped and
ends with the same model as an uninterrupted one: every random draw comes from one torch.Generator
whose state is saved with the weights, the optimizer and the LR schedule.
Memory: the stream is held once as columnar tensors (no per-epoch copy, no per-example Python
objects); an epoch is a permutation of indices. train.workers > 1 trains data-parallel with
torch DDP (models/distributed.py); 1 keeps this single-process path unchanged.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.profiler import record_function

from models.encoding import FeatureEncoder, longest_list, pad_lists, parquet_column
from models.losses import LOSSES, info_nce
from models.negatives import popularity_distribution
from models.params import ModelParams, TrainParams
from models.ssl import ItemAugmenter, build_augmenter
from models.towers import Batch, TwoTower, TwoTowerConfig
from models.early_stopping import ValidationTask

HARD_NEGATIVES_COLUMN = "hard_negatives"


def model_config(encoder: FeatureEncoder, params: ModelParams) -> TwoTowerConfig:
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
        embedding_dim=params.embedding_dim,
        hidden=list(params.hidden),
        dim=params.dim,
        user_id_embedding=params.user_id_embedding,
        temperature=params.temperature,
        learn_temperature=params.learn_temperature,
    )


def to_tensors(arrays: dict[str, np.ndarray]) -> Batch:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def catalog_inputs(encoder: FeatureEncoder, items: pd.DataFrame) -> Batch:
    """Item tower inputs for every item-vocabulary index (row i = index i). Items that only occur in
    interactions, and row 0 (OOV), keep default features (OOV categories, mean numerics)."""
    enc = encoder.encode_items(items.drop_duplicates("item_id"))
    n = encoder.item_ids.size
    out = {}
    for key, arr in enc.items():
        full = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
        full[enc["item"]] = arr
        out[key] = full
    out["item"] = np.arange(n, dtype=np.int64)
    return to_tensors(out)


def gather(batch: Batch, idx: torch.Tensor) -> Batch:
    return {k: v[idx] for k, v in batch.items()}


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory (a memory map stays on disk; rows are read on indexing)."""
    return torch.from_numpy(arr if isinstance(arr, np.memmap) else np.ascontiguousarray(arr))


def _list_widths(encoder: FeatureEncoder, lists: Callable[[str], Iterable]) -> dict[str, int]:
    """Fixed widths of the list inputs, so that every batch writes into the same (N, width) array:
    history = the encoder's history length; multi-valued features and hard negatives = their longest
    list (lists(column) yields the column's chunks: a pre-pass reads that one column only)."""
    widths = {"history": encoder.history_length, "hard": longest_list(lists(HARD_NEGATIVES_COLUMN))}
    widths.update({f"multi:{c}": longest_list(lists(c)) for c in encoder.users.multi})
    return widths


@dataclass
class TrainingStream:
    """The positive stream, pre-encoded: per-example user inputs, item indices, weights, log Q, hard
    negatives (item indices, 0 = padding), and each user's positive items (CSR) for masking accidental hits.

    Built from a DataFrame (in memory) or streamed from a parquet file in row batches (`from_parquet`):
    then the wide per-example arrays (history, features, hard negatives) are written to memory-mapped
    .npy files in a spill folder and batches gather their rows from there, so the process holds one
    parquet batch plus the 1-D columns (ids, weights, user-item pairs: tens of bytes per example)."""

    users: Batch                      # per example
    items: Batch                      # per item-vocabulary index
    item_idx: torch.Tensor            # (N,)
    weights: torch.Tensor             # (N,)
    counts: torch.Tensor              # (n_items,) positives per item in the stream
    hard: torch.Tensor                # (N, W) hard-negative item indices, W = 0 without any
    pos_ptr: torch.Tensor             # (n_users + 1,) CSR row pointers: user index -> its positives
    pos_items: torch.Tensor           # (P,) item indices of each user's positives, by user
    mapped: dict[str, Path] = field(default_factory=dict)  # users key (or "hard") -> its .npy memory map

    def __getstate__(self) -> dict:
        """Memory-mapped arrays travel as their file paths (data-parallel workers map the same
        files instead of receiving a copy)."""
        state = dict(self.__dict__)
        state["users"] = {k: None if k in self.mapped else v for k, v in self.users.items()}
        if "hard" in self.mapped:
            state["hard"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for key, path in self.mapped.items():
            tensor = _tensor(np.load(path, mmap_mode="r+"))
            if key == "hard":
                self.hard = tensor
            else:
                self.users[key] = tensor

    @classmethod
    def build(cls, encoder: FeatureEncoder, examples: pd.DataFrame, items: pd.DataFrame,
              catalog: Batch | None = None) -> "TrainingStream":
        """From rows in memory (one batch)."""
        widths = _list_widths(encoder, lambda c: [examples[c]] if c in examples.columns else [])
        return cls._assemble(encoder, [examples], len(examples), widths, items, catalog, spill=None)

    @classmethod
    def from_parquet(cls, encoder: FeatureEncoder, path: Path, items: pd.DataFrame,
                     catalog: Batch | None = None, spill: Path | None = None,
                     batch_rows: int = 50_000) -> "TrainingStream":
        """Streamed from a parquet file, batch_rows rows at a time; spill: folder of the memory-mapped
        arrays (None: in memory). Same arrays, hence the same training, as `build` on the whole file."""
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        widths = _list_widths(encoder, lambda column: parquet_column(path, column, batch_rows))
        # list columns stay arrow-backed (pd.ArrowDtype): no Python object per list or value
        arrow_lists = lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) or pa.types.is_large_list(t) else None  # noqa: E731
        frames = (b.to_pandas(types_mapper=arrow_lists) for b in f.iter_batches(batch_size=batch_rows))
        return cls._assemble(encoder, frames, f.metadata.num_rows, widths, items, catalog, spill)

    @classmethod
    def _assemble(cls, encoder: FeatureEncoder, frames, n: int, widths: dict[str, int],
                  items: pd.DataFrame, catalog: Batch | None, spill: Path | None) -> "TrainingStream":
        item_idx = np.zeros(n, np.int64)
        weights = np.ones(n, np.float32)
        arrays: dict[str, np.ndarray] = {}
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
            spill.mkdir(parents=True)

        mapped: dict[str, Path] = {}

        def column(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            if spill is None or len(shape) == 1:
                return np.zeros(shape, dtype)
            mapped[name] = spill / f"{name.replace(':', '_')}.npy"
            return np.lib.format.open_memmap(mapped[name], mode="w+", dtype=dtype, shape=shape)
        at = 0
        for frame in frames:
            end = at + len(frame)
            item_idx[at:end] = encoder.item_ids.lookup(frame["item_id"])
            if "weight" in frame.columns:
                weights[at:end] = frame["weight"].to_numpy(np.float32)
            enc = encoder.encode_users(frame)
            if HARD_NEGATIVES_COLUMN in frame.columns:
                enc["hard"] = pad_lists(frame[HARD_NEGATIVES_COLUMN], encoder.item_ids)
            for name, arr in enc.items():
                if name not in arrays:
                    width = widths.get(name)
                    shape = (n,) if arr.ndim == 1 else (n, width if width is not None else arr.shape[1])
                    arrays[name] = column(name, shape, arr.dtype)
                target = arrays[name]
                if arr.ndim == 1:
                    target[at:end] = arr
                else:
                    target[at:end, :arr.shape[1]] = arr[:, :target.shape[1]]
            at = end
        if at != n:
            raise ValueError(f"the training stream yielded {at} rows, expected {n}")
        hard = arrays.pop("hard", np.zeros((n, 0), np.int64))
        if hard.shape[1] and not hard.any():
            hard = np.zeros((n, 0), np.int64)
            mapped.pop("hard", None)
        if not arrays:      # an empty stream: the arrays' shapes come from an empty encode
            arrays = encoder.encode_users(pd.DataFrame({"user_id": pd.Series([], dtype=object)}))
        users = {k: _tensor(v) for k, v in arrays.items()}
        counts = np.bincount(item_idx, minlength=encoder.item_ids.size)
        pairs = np.unique(np.stack([users["user"].numpy(), item_idx], axis=1), axis=0).reshape(-1, 2)
        ptr = np.concatenate([[0], np.cumsum(np.bincount(pairs[:, 0], minlength=encoder.user_ids.size))])
        return cls(users=users, items=catalog if catalog is not None else catalog_inputs(encoder, items),
                   item_idx=torch.from_numpy(item_idx), weights=torch.from_numpy(weights),
                   counts=torch.from_numpy(counts), hard=_tensor(hard),
                   pos_ptr=torch.from_numpy(ptr.astype(np.int64)),
                   pos_items=torch.from_numpy(np.ascontiguousarray(pairs[:, 1])), mapped=mapped)

    def __len__(self) -> int:
        return len(self.item_idx)

    @property
    def n_items(self) -> int:
        return len(self.counts)

    @property
    def log_q(self) -> torch.Tensor:
        """(n_items,) log of each item's share of the stream (items absent from it are never read)."""
        return torch.log(self.counts.clamp(min=1).to(torch.float32) / max(len(self), 1))

    def hits(self, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, C) bool: is candidate item j a positive of row i's user in this stream?

        Per batch, not through a (users x items) table: the batch users' positives are gathered from
        the CSR lists and matched against the distinct candidates, so the cost is the size of those
        lists, whatever the catalog size."""
        uniq, col = torch.unique(candidates, return_inverse=True)          # (U,), (C,)
        start, end = self.pos_ptr[user], self.pos_ptr[user + 1]             # (B,), (B,)
        length = end - start
        row = torch.repeat_interleave(torch.arange(len(user)), length)      # (L,)
        offset = torch.arange(int(length.sum())) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
        item = self.pos_items[torch.repeat_interleave(start, length) + offset]  # (L,)
        lookup = torch.full((self.n_items,), -1, dtype=torch.int64)          # item -> slot in uniq
        lookup[uniq] = torch.arange(len(uniq))
        slot = lookup[item]                                                 # (L,)
        found = slot >= 0
        table = torch.zeros((len(user), len(uniq)), dtype=torch.bool)       # (B, U)
        table[row[found], slot[found]] = True
        return table[:, col]                                                # (B, C)


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

    def summary(self, n_examples: int) -> dict:
        total = sum(self.seconds)
        out = {
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


class BatchLoss:
    """Retrieval loss (+ α · SSL loss) of one batch: in-batch negatives, shared easy negatives drawn
    ∝ popularity^easy_power, the examples' own hard negatives, accidental hits masked."""

    def __init__(self, stream: TrainingStream, cfg: TrainParams, augmenter: ItemAugmenter | None):
        self.stream, self.cfg, self.augmenter = stream, cfg, augmenter
        counts = stream.counts.numpy()
        self.n_hard = min(round(cfg.negatives * cfg.hard_ratio), stream.hard.shape[1])
        self.n_easy = cfg.negatives - round(cfg.negatives * cfg.hard_ratio)
        self.easy_p = torch.from_numpy(popularity_distribution(counts, cfg.easy_power)).to(torch.float32)
        self.ssl_p = torch.from_numpy(popularity_distribution(counts, cfg.ssl_power)).to(torch.float32)
        self.log_q = stream.log_q
        self.listwise_logq = cfg.loss == "listwise" and cfg.logq

    def __call__(self, model: TwoTower, b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # record_function labels name the parts of a step in models/bench_train.py's profile; they cost
        # nothing measurable when no profiler is running
        s, tau = self.stream, model.tau()
        item = s.item_idx[b]                                                # (B,)
        user = s.users["user"][b]                                           # (B,)
        with record_function("towers"):
            q, c = model(gather(s.users, b), gather(s.items, item))         # (B, D), (B, D)
        with record_function("in-batch logits + hit mask"):
            pos = (q * c).sum(dim=1) / tau                                  # (B,)
            # in-batch: column j is row j's positive; its own column and same-item columns are no negatives
            inb = q @ c.T / tau                                             # (B, B)
            valid = (item.unsqueeze(0) != item.unsqueeze(1)) & ~s.hits(user, item)
            if self.listwise_logq:
                # logit - log(expected count of j among the B in-batch negatives) (Yi et al. 2019)
                correction = self.log_q[item] + math.log(len(b))            # (B,)
                inb = inb - correction.unsqueeze(0)
                pos = pos - correction
        negs, valids = [inb], [valid]
        if self.n_easy:
            with record_function("easy negatives"):
                e = torch.multinomial(self.easy_p, self.n_easy, replacement=True, generator=gen)  # (K,)
                easy = q @ model.encode_items(gather(s.items, e)).T / tau  # (B, K)
                if self.listwise_logq:
                    easy = easy - torch.log(self.n_easy * self.easy_p[e]).unsqueeze(0)
                negs.append(easy)
                valids.append((e.unsqueeze(0) != item.unsqueeze(1)) & ~s.hits(user, e))
        if self.n_hard:
            with record_function("hard negatives"):
                pool = s.hard[b]                                            # (B, W)
                # a random n_hard of each row's stored negatives, padding last
                key = torch.rand(pool.shape, generator=gen) + (pool == 0).to(torch.float32)
                h = pool.gather(1, key.argsort(dim=1)[:, :self.n_hard])     # (B, H)
                uniq, inv = torch.unique(h, return_inverse=True)
                ch = model.encode_items(gather(s.items, uniq))              # (U, D)
                hard = (q.unsqueeze(1) * ch[inv]).sum(dim=-1) / tau         # (B, H)
                negs.append(hard)   # no log Q: they are chosen per example, not sampled from a proposal
                valids.append((h != 0) & (h != item.unsqueeze(1)))
        with record_function("retrieval loss"):
            loss = LOSSES[self.cfg.loss](pos, torch.cat(negs, dim=1), torch.cat(valids, dim=1), s.weights[b])
        if self.augmenter is not None and self.cfg.ssl_weight > 0:
            with record_function("ssl"):
                loss = loss + self.cfg.ssl_weight * self.ssl_loss(model, gen)
        return loss

    def ssl_loss(self, model: TwoTower, gen: torch.Generator) -> torch.Tensor:
        """InfoNCE between two masked views of an item batch drawn closer to uniform than the stream."""
        n = min(self.cfg.ssl_batch_size, int((self.ssl_p > 0).sum()))
        idx = torch.multinomial(self.ssl_p, n, replacement=False, generator=gen)   # (S,) distinct items
        v1, v2 = self.augmenter.views(gather(self.stream.items, idx), gen)
        return info_nce(model.encode_items(v1), model.encode_items(v2), self.cfg.ssl_temperature)


def lr_factor(cfg: TrainParams, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step t: constant, or cosine decay to 10% over cfg.epochs."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.lr_schedule == "constant":
        return lambda t: 1.0
    return lambda t: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


def make_augmenter(stream: TrainingStream, cfg: TrainParams, notes: list[str]) -> ItemAugmenter | None:
    if cfg.ssl_weight <= 0:
        return None
    aug = build_augmenter(stream.items, stream.counts.numpy(), cfg.ssl_masking, cfg.ssl_dropout)
    if not aug.can_mask and not any(k.startswith("multi:") for k in stream.items):
        notes.append("ssl skipped: the item tower has a single feature, so two views cannot differ")
        return None
    return aug


def fit(stream: TrainingStream, config: TwoTowerConfig, cfg: TrainParams, seed: int,
        epochs: int | None = None, validation: ValidationTask | None = None,
        checkpoint: Path | None = None, log: Callable[[str], None] | None = None,
        on_epoch: Callable[[int], None] | None = None) -> FitResult:
    """Train for `epochs` (default cfg.epochs). With `validation` and cfg.early_stopping, stop after
    cfg.patience epochs without a better validation NDCG@20. `checkpoint`: a file written after every
    epoch and resumed from when it exists. `on_epoch(epoch)` runs after each checkpoint.
    Same inputs + seed → same model, whether or not the run was interrupted and resumed.

    cfg.workers > 1: data-parallel over that many processes (models/distributed.py); inside an
    initialized torch.distributed group (those processes, or a torchrun launch) this process trains
    its rank's shard and only rank 0 logs, validates and writes the checkpoint."""
    if len(stream) == 0:
        raise ValueError("the training stream is empty: nothing to train on")
    from models import distributed

    rank, world = distributed.rank_and_world()
    if world == 1 and cfg.workers > 1:
        return distributed.spawn_fit(stream, config, cfg, seed, epochs, validation, checkpoint, log, on_epoch)
    lead = rank == 0
    epochs = epochs or cfg.epochs
    torch.manual_seed(seed)
    model = TwoTower(config)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(stream)
    steps = math.ceil(math.ceil(n / world) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps))
    gen = torch.Generator().manual_seed(seed)       # the permutation: the same on every rank
    result = FitResult(model=model)
    augmenter = make_augmenter(stream, cfg, result.notes)
    batch_loss = BatchLoss(stream, cfg, augmenter)
    if cfg.negatives and batch_loss.n_hard == 0 and cfg.hard_ratio > 0:
        result.notes.append("no hard negatives in the stream (ranking logs empty or none before the examples)")
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        for name in ("losses", "seconds", "val_ndcg", "best_epoch", "stopped_early"):
            setattr(result, name, state[name])
        result.resumed_from = len(result.losses)
    step = distributed.parallel_step(model, batch_loss) if world > 1 else None
    while len(result.losses) < epochs and not result.stopped_early:
        model.train()
        start_time = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        if world > 1:
            perm = distributed.shard(perm, rank, world)
            # each rank draws its own negatives and SSL items; seeded per (seed, epoch, rank), so a
            # resumed run draws what the uninterrupted one did without saving every rank's state
            sampler = distributed.rank_generator(seed, len(result.losses), rank)
        total, seen = 0.0, 0
        for start in range(0, len(perm), cfg.batch_size):
            b = perm[start:start + cfg.batch_size]                          # (B,)
            loss = batch_loss(model, b, gen) if step is None else step(b, sampler)
            opt.zero_grad(set_to_none=True)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                opt.step()
                sched.step()
            total += float(loss.detach()) * len(b)
            seen += len(b)
        if world > 1:
            total, seen = distributed.sum_over_ranks(total, seen)
        result.losses.append(total / seen)
        result.seconds.append(time.perf_counter() - start_time)
        epoch = len(result.losses)
        line = f"epoch {epoch}/{epochs} loss {result.losses[-1]:.4f} {result.seconds[-1]:.1f} s " \
               f"({n / result.seconds[-1]:.0f} examples/s)"
        if validation is not None:
            if lead:
                result.val_ndcg.append(validation.ndcg(model, stream.items))
                best = int(np.argmax(result.val_ndcg))      # first best: ties keep the shorter run
                result.best_epoch = best + 1
                result.stopped_early = cfg.early_stopping and epoch - result.best_epoch >= cfg.patience
                line += f" val ndcg@20 {result.val_ndcg[-1]:.4f} (best {result.best_epoch})"
            if world > 1:   # every rank must stop at the same epoch, or the others wait forever
                result.val_ndcg, result.best_epoch, result.stopped_early = distributed.from_rank0(
                    [result.val_ndcg, result.best_epoch, result.stopped_early])
        if lead and log is not None:
            log(line)
        if lead and checkpoint is not None:
            _save_checkpoint(checkpoint, model, opt, sched, gen, result)
        if lead and on_epoch is not None:
            on_epoch(epoch)
    model.eval()
    return result


def _save_checkpoint(path: Path, model: TwoTower, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, result: FitResult) -> None:
    """Write then rename, so a kill during the write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                "generator": gen.get_state(), "losses": result.losses, "seconds": result.seconds,
                "val_ndcg": result.val_ndcg, "best_epoch": result.best_epoch,
                "stopped_early": result.stopped_early}, tmp)
    tmp.replace(path)


def save_model(out_dir: Path, model: TwoTower, encoder: FeatureEncoder, extra: dict | None = None) -> None:
    """out_dir/model.pt (config + weights), encoder.json (vocabularies), model.json (readable config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, out_dir / "model.pt")
    encoder.save(out_dir / "encoder.json")
    meta = {"config": model.cfg.to_dict(), **(extra or {})}
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
