"""Fine-tuning a trained TwoTower on new interactions (train.update: finetune, docs/INCREMENTAL.md).

The new data can bring users, items and feature values the trained model has never seen. The
trained encoder's vocabularies are kept in their order and the new values appended after them, so
every trained embedding row keeps its index and its value; the new rows start from the model's usual
initialization. Numeric standardization stays the trained one (the towers learned on that scale).
The rows to train on are the interactions newer than the trained model's data plus a replay sample of
the older ones, which limits forgetting (experience replay, as in continual learning).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.checkpoint import save_warm_start
from models.encoding import FeatureEncoder, SideEncoder, Vocab
from models.errors import ModelError
from models.params import TrainParams
from models.parquet_stream import open_stream
from models.stream import TrainingStream
from models.towers import TwoTower, TwoTowerConfig
from models.training import PROGRESS_FIELDS, FitResult, fit

# TwoTowerConfig fields that are vocabulary sizes: these may grow, every other field must match
SIZE_FIELDS = ("n_items", "n_users", "user_categorical", "item_categorical", "user_multi", "item_multi")


class IncompatibleModel(ModelError):
    """The trained model cannot start this training (other feature columns or architecture)."""


def extend_vocab(trained: Vocab, fresh: Vocab) -> Vocab:
    """The trained values in their order (indices unchanged), then the fresh values it lacks."""
    known = set(trained.values)
    return Vocab(values=[*trained.values, *(v for v in fresh.values if v not in known)], kind=trained.kind)


def _extend_side(trained: SideEncoder, fresh: SideEncoder, what: str) -> SideEncoder:
    for kind in ("categorical", "numeric", "multi"):
        if list(getattr(trained, kind)) != list(getattr(fresh, kind)):
            raise IncompatibleModel(f"{what} {kind} features changed: trained on {list(getattr(trained, kind))}, "
                                    f"now {list(getattr(fresh, kind))}")
    return SideEncoder(categorical={c: extend_vocab(v, fresh.categorical[c]) for c, v in trained.categorical.items()},
                       numeric=dict(trained.numeric),
                       multi={c: extend_vocab(v, fresh.multi[c]) for c, v in trained.multi.items()})


def extend_encoder(trained: FeatureEncoder, fresh: FeatureEncoder) -> FeatureEncoder:
    """An encoder for the new data that maps every value the trained one knew to the same index."""
    if (trained.item_ids.kind, trained.user_ids.kind) != (fresh.item_ids.kind, fresh.user_ids.kind):
        raise IncompatibleModel("the id types changed since the model was trained")
    return FeatureEncoder(item_ids=extend_vocab(trained.item_ids, fresh.item_ids),
                          user_ids=extend_vocab(trained.user_ids, fresh.user_ids),
                          users=_extend_side(trained.users, fresh.users, "user"),
                          items=_extend_side(trained.items, fresh.items, "item"),
                          history_length=fresh.history_length)


def grow_model(trained: TwoTower, cfg: TwoTowerConfig, seed: int) -> TwoTower:
    """A TwoTower of `cfg` holding the trained weights; embedding tables that grew get fresh rows
    (the model's usual init, from `seed`) after the trained ones."""
    old, new = trained.cfg.to_dict(), cfg.to_dict()
    changed = [k for k in new if k not in SIZE_FIELDS and new[k] != old[k]]
    if changed:
        raise IncompatibleModel("model params changed since the model was trained: "
                                + ", ".join(f"{k} {old[k]} -> {new[k]}" for k in changed))
    torch.manual_seed(seed)
    model = TwoTower(cfg)
    state = model.state_dict()
    for name, value in trained.state_dict().items():
        target = state[name]
        if target.shape == value.shape:
            target.copy_(value)
        elif target.dim() == 2 and target.shape[1:] == value.shape[1:] and target.shape[0] > value.shape[0]:
            target[:value.shape[0]].copy_(value)          # (n_old, E) of (n_new, E): trained rows first
        else:
            raise IncompatibleModel(f"{name}: trained shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
    model.load_state_dict(state)
    return model


@dataclass(frozen=True)
class UpdateRows:
    rows: pd.DataFrame         # the rows to fine-tune on: new + replay, in their original order
    cutoff: pd.Timestamp | None
    new: int
    replay: int


def replayed_rows(newer: np.ndarray, replay: float, seed: int, per_new: float | None = None) -> np.ndarray:
    """Bool per row: the older rows (not `newer`) replayed beside the new ones, a `replay` share drawn
    with `seed`, at most `per_new` per new row."""
    rng = np.random.default_rng(seed)
    replayed = ~newer & (rng.random(len(newer)) < replay)
    if per_new is not None and replayed.sum() > per_new * newer.sum():
        # keep a uniform subset of the drawn replay rows: the cap scales the replay to what is new
        drawn = np.flatnonzero(replayed)
        replayed[:] = False
        replayed[rng.choice(drawn, size=int(per_new * newer.sum()), replace=False)] = True
    return replayed


def newer_than(times: pd.Series, cutoff: pd.Timestamp, inclusive: bool = False) -> np.ndarray:
    """Bool per row: its time is after `cutoff` (at or after it when inclusive)."""
    times = pd.to_datetime(times, utc=True)
    return (times >= cutoff if inclusive else times > cutoff).to_numpy()


def update_rows(rows: pd.DataFrame, cutoff: pd.Timestamp | None, replay: float, seed: int,
                inclusive: bool = False, per_new: float | None = None) -> UpdateRows:
    """The rows after `cutoff` (at or after it when inclusive) plus a `replay` share of the older ones
    (drawn with `seed`), at most `per_new` replayed rows per new row. No cutoff (a model that did not
    record one): every row. No new row: no row (there is nothing new to learn; the caller keeps the
    model as it is)."""
    if cutoff is None:
        return UpdateRows(rows, None, len(rows), 0)
    newer = newer_than(rows["timestamp"], cutoff, inclusive)
    replayed = replayed_rows(newer, replay, seed, per_new)
    keep = newer | replayed
    return UpdateRows(rows[keep].reset_index(drop=True), cutoff, int(newer.sum()), int(replayed.sum()))


def write_rows(source: Path, keep: np.ndarray, out: Path, batch_rows: int) -> int:
    """The rows of parquet `source` where `keep` (bool per row) holds, streamed into parquet `out` in
    batches of `batch_rows` (memory bounded by a batch, whatever the stream's size; the whole stream
    as a DataFrame was the history lists of every row). Written beside `out` and moved into place:
    a reader never finds half a file. Returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source_file = open_stream(source)
    if source_file.metadata.num_rows != len(keep):
        raise ModelError(f"{source}: {source_file.metadata.num_rows} rows, but {len(keep)} row choices")
    partial = out.with_name(out.name + ".partial")
    written, start = 0, 0
    with pq.ParquetWriter(partial, source_file.schema_arrow) as writer:
        for batch in source_file.iter_batches(batch_size=batch_rows):
            mask = keep[start:start + batch.num_rows]
            start += batch.num_rows
            if mask.any():
                writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(mask)))
                written += int(mask.sum())
    partial.replace(out)
    return written


def data_until(examples: pd.DataFrame) -> str | None:
    """The newest interaction time a model trains on (ISO, UTC): the next fine-tune's cutoff."""
    if "timestamp" not in examples.columns or not len(examples):
        return None
    return pd.to_datetime(examples["timestamp"], utc=True).max().isoformat()


def finetune(model: TwoTower, stream: TrainingStream, train_cfg: TrainParams, seed: int, workdir: Path,
             log: Callable[[str], None] | None = None) -> FitResult:
    """Train `model` (already grown to the stream's encoder) for train_cfg.epochs in this process: the
    training loop resumes from a warm-start checkpoint holding its weights (models/checkpoint.py), so
    a fine-tune is the ordinary loop with another starting point."""
    checkpoint = workdir / "finetune.pt"
    if not checkpoint.exists():
        save_warm_start(checkpoint, model, train_cfg, seed, PROGRESS_FIELDS)
    return fit(stream, model.cfg, train_cfg, seed, checkpoint=checkpoint, log=log)
