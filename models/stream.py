"""The positive stream a TwoTower trains on, encoded into tensors once.

A batch is a slice of a seeded permutation of the stream's rows, and the item side of a batch is a
gather from the pre-encoded catalog, so there is no per-example Python work in the training loop.
Memory: the stream is held once as columnar tensors (no per-epoch copy, no per-example Python
objects); the wide per-example arrays can live in memory-mapped files (`TrainingStream.from_parquet`).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from models.encoding import FeatureEncoder, longest_list, pad_lists, parquet_column
from models.negatives import HARD_NEGATIVES_COLUMN
from models.parquet_stream import open_stream
from models.towers import Batch


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


def _columns(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """rows[:, columns] as one gather along the columns: the demo's (1024 x 1,684) -> (1024 x 1024)
    took 1.0 ms this way against 3.0 ms by advanced indexing (2 threads), 2.6 through one flat index."""
    return torch.gather(rows, 1, columns.expand(len(rows), -1))


def _expand(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups of `counts` elements: (group of each element, its rank within the group)."""
    total, dev = int(counts.sum()), counts.device
    group = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts
    return group, torch.arange(total, device=dev) - first[group]


def _groups(labels: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions grouped by label (0..len(counts)-1, `counts` = their bincount): (positions sorted by
    label, (len(counts) + 1,) CSR pointers)."""
    order = torch.argsort(labels, stable=True)
    ptr = torch.zeros(len(counts) + 1, dtype=torch.int64, device=counts.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return order, ptr


# TrainingStream.hits gathers a dense table instead of spreading the matched pairs when they spread to
# more than 1 / DENSE_HITS of the mask (the two cost the same at ~55k of a 1024 x 1024 mask's entries)
DENSE_HITS = 20
# Small catalogs: TrainingStream.hits reads rows of one (users x items) table of the whole stream, built
# once (one byte an entry), when the catalog has at most TABLE_MAX_ITEMS items and the table at most
# TABLE_MAX_ENTRIES entries. Gathering a batch's 1,024 rows costs a row's width each: the demo's 944 x
# 1,684 table answered a batch in 1.1 ms where the per-batch matching took 5.0 ms (its users' positive
# lists total ~75k entries a batch); a 5,000 x 6,000 one took 2.1 ms.
TABLE_MAX_ITEMS = 4096
TABLE_MAX_ENTRIES = 64 * 2**20


def gather(batch: Batch, idx: torch.Tensor) -> Batch:
    """Rows idx of every input, index columns widened back to int64 (see _Columns)."""
    return {k: widen(v[idx]) for k, v in batch.items()}


def widen(t: torch.Tensor) -> torch.Tensor:
    """int32 index rows (as the stream stores them) as the int64 the towers and masks use."""
    return t.long() if t.dtype == torch.int32 else t


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


INDEX_LIMIT = np.iinfo(np.int32).max


class _Columns:
    """The stream's per-example arrays, allocated on first write: (n,) or (n, width) each; 2-D ones
    are memory-mapped .npy files in `spill` when it is set (1-D columns are small: kept in memory).
    2-D integer columns (history, hard negatives, categories: vocabulary indices) are stored as int32
    and widened per batch (`gather`): at 10M examples the history alone was 4.0 GB as int64, and every
    page a shuffled epoch touches stays resident (the process's RSS counts the mapped pages)."""

    def __init__(self, n: int, widths: dict[str, int], spill: Path | None):
        self.n, self.widths, self.spill = n, widths, spill
        self.arrays: dict[str, np.ndarray] = {}
        self.mapped: dict[str, Path] = {}
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
            spill.mkdir(parents=True)

    def _allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if self.spill is None or len(shape) == 1:
            return np.zeros(shape, dtype)
        self.mapped[name] = self.spill / f"{name.replace(':', '_')}.npy"
        return np.lib.format.open_memmap(self.mapped[name], mode="w+", dtype=dtype, shape=shape)

    def write(self, name: str, arr: np.ndarray, at: int, end: int) -> None:
        """Rows at:end of column `name`; a list column is padded or cut to the column's width."""
        narrow = arr.ndim == 2 and arr.dtype == np.int64
        if narrow and arr.size and (arr.max() > INDEX_LIMIT or arr.min() < 0):
            raise ValueError(f"stream column {name}: index values outside [0, {INDEX_LIMIT}]")
        if name not in self.arrays:
            width = self.widths.get(name)
            shape = (self.n,) if arr.ndim == 1 else (self.n, width if width is not None else arr.shape[1])
            self.arrays[name] = self._allocate(name, shape, np.dtype(np.int32) if narrow else arr.dtype)
        target = self.arrays[name]
        if arr.ndim == 1:
            target[at:end] = arr
        else:
            target[at:end, :arr.shape[1]] = arr[:, :target.shape[1]]


def _positives_by_user(user: np.ndarray, item_idx: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's distinct positive items as CSR: (n_users + 1,) row pointers, (P,) item indices."""
    pairs = np.unique(np.stack([user, item_idx], axis=1), axis=0).reshape(-1, 2)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(pairs[:, 0], minlength=n_users))])
    return ptr.astype(np.int64), np.ascontiguousarray(pairs[:, 1])


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
    hard: torch.Tensor                # (N, W) int32 hard-negative item indices, W = 0 without any
    pos_ptr: torch.Tensor             # (n_users + 1,) CSR row pointers: user index -> its positives
    pos_items: torch.Tensor           # (P,) item indices of each user's positives, by user
    mapped: dict[str, Path] = field(default_factory=dict)  # users key (or "hard") -> its .npy memory map
    table: torch.Tensor | None = field(default=None, repr=False)   # (n_users, n_items) bool, see `hits`
    # what `hits` reads, copied once to each GPU it is asked on: (pos_ptr, pos_items, table or None)
    on_device: dict[torch.device, tuple] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        """Memory-mapped arrays travel as their file paths (data-parallel workers map the same
        files instead of receiving a copy); the hit table is rebuilt where it is used."""
        state = dict(self.__dict__)
        state["table"] = None
        state["on_device"] = {}
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
        f = open_stream(path)
        widths = _list_widths(encoder, lambda column: parquet_column(path, column, batch_rows))
        # list columns stay arrow-backed (pd.ArrowDtype): no Python object per list or value
        arrow_lists = lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) or pa.types.is_large_list(t) else None  # noqa: E731
        frames = (b.to_pandas(types_mapper=arrow_lists) for b in f.iter_batches(batch_size=batch_rows))
        return cls._assemble(encoder, frames, f.metadata.num_rows, widths, items, catalog, spill)

    @classmethod
    def _assemble(cls, encoder: FeatureEncoder, frames: Iterable[pd.DataFrame], n: int, widths: dict[str, int],
                  items: pd.DataFrame, catalog: Batch | None, spill: Path | None) -> "TrainingStream":
        item_idx = np.zeros(n, np.int64)
        weights = np.ones(n, np.float32)
        columns = _Columns(n, widths, spill)
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
                columns.write(name, arr, at, end)
            at = end
        if at != n:
            raise ValueError(f"the training stream yielded {at} rows, expected {n}")
        arrays, mapped = columns.arrays, columns.mapped
        hard = arrays.pop("hard", np.zeros((n, 0), np.int32))
        if hard.shape[1] and not hard.any():
            hard = np.zeros((n, 0), np.int32)
            mapped.pop("hard", None)
        if not arrays:      # an empty stream: the arrays' shapes come from an empty encode
            arrays = encoder.encode_users(pd.DataFrame({"user_id": pd.Series([], dtype=object)}))
        users = {k: _tensor(v) for k, v in arrays.items()}
        ptr, pos_items = _positives_by_user(users["user"].numpy(), item_idx, encoder.user_ids.size)
        return cls(users=users, items=catalog if catalog is not None else catalog_inputs(encoder, items),
                   item_idx=torch.from_numpy(item_idx), weights=torch.from_numpy(weights),
                   counts=torch.from_numpy(np.bincount(item_idx, minlength=encoder.item_ids.size)),
                   hard=_tensor(hard), pos_ptr=torch.from_numpy(ptr), pos_items=torch.from_numpy(pos_items),
                   mapped=mapped)

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

        A small catalog (TABLE_MAX_ITEMS) reads rows of one (users x items) table of the whole
        stream, built once. Larger ones match per batch, whatever the catalog size: the batch users'
        positives are gathered from the CSR lists and matched against the distinct candidates, so
        the cost is the size of those lists. Few matches are then spread to the rows and columns
        that hold their user and item and written into the mask directly: a dense (users x
        candidates) table gathered to (B, C) cost more than the rest of this function together (at
        700k interactions 6.5-7.3 ms a batch with it, 2.4-3.3 without; docs/TRAINING.md). Matches
        that fill more than 1 / DENSE_HITS of the mask (long histories) go through that table,
        which is then the cheaper of the two."""
        dev = user.device
        pos_ptr, pos_items, table = self._hit_inputs(dev)
        if table is not None:
            return _columns(table[user], candidates)
        uniq, col = torch.unique(candidates, return_inverse=True)          # (U,), (C,)
        # each distinct user once: active users fill a batch several times, and their positive lists
        # are the longest (the lists' total length is most of this function's cost)
        users, row_of = torch.unique(user, return_inverse=True)             # (V,), (B,)
        start = pos_ptr[users]                                               # (V,)
        counts = pos_ptr[users + 1] - start                                  # (V,) list lengths
        ends = torch.cumsum(counts, 0)                                       # (V,) where each list ends in L
        total = int(ends[-1]) if len(ends) else 0
        # entry e of the concatenated lists reads pos_items[start[u] + e - (ends[u] - counts[u])]: one
        # repeat of the per-list shift, no per-entry list slot (only the matches need theirs, below)
        shift = torch.repeat_interleave(start - (ends - counts), counts, output_size=total)
        item = pos_items[torch.arange(total, device=dev) + shift]           # (L,) the listed positives
        lookup = torch.full((self.n_items,), -1, dtype=torch.int64, device=dev)   # item -> slot in uniq, or -1
        lookup[uniq] = torch.arange(len(uniq), device=dev)
        cand = lookup[item]
        matched = (cand >= 0).nonzero().squeeze(1)                           # (K,) entries in L
        pair_user = torch.searchsorted(ends, matched, right=True)           # (K,) their user slot
        pair_item = cand[matched]                                            # (K,) their item slot
        # how many mask entries the pairs spread to: where hits are dense (the demo: 31% of a batch's
        # (B, B) mask, 326k entries from 52k pairs), spreading them one by one cost 8.7 ms a batch and a
        # (users x distinct items) table gathered to (B, C) 1.9 ms; where they are sparse (the 700k
        # bench shape: 0.7%, 7k entries) spreading cost 0.5 ms and the table 1.5 ms
        rows_per_user = torch.bincount(row_of, minlength=len(users))
        cols_per_item = torch.bincount(col, minlength=len(uniq))
        spread = int((rows_per_user[pair_user] * cols_per_item[pair_item]).sum())
        if spread * DENSE_HITS > len(user) * len(candidates):
            table = torch.zeros((len(users), len(uniq)), dtype=torch.bool, device=dev)
            table[pair_user, pair_item] = True
            return _columns(table[row_of], col)
        rows_of_user, row_ptr = _groups(row_of, rows_per_user)
        cols_of_item, col_ptr = _groups(col, cols_per_item)
        # each matched pair to every batch row of its user, then to every column of its item
        k, j = _expand(rows_per_user[pair_user])
        row = rows_of_user[row_ptr[pair_user[k]] + j]
        pair_item = pair_item[k]
        k, j = _expand(cols_per_item[pair_item])
        out = torch.zeros((len(user), len(candidates)), dtype=torch.bool, device=dev)
        out[row[k], cols_of_item[col_ptr[pair_item[k]] + j]] = True
        return out

    def _hit_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pos_ptr, pos_items, the users x items table or None) on `device`. On a GPU the batch's hit
        mask is built there from a copy made once: built on the CPU and copied each step, the masks
        were most of a GPU step (batch 8,192 on an H200: 21.7 ms filling them on the host and 11.2 ms
        copying them over, of a 79 ms step; the GPU's own work was 5.4 ms). Same booleans either way."""
        if device.type == "cpu":
            return self.pos_ptr, self.pos_items, self._user_item_table()
        if device not in self.on_device:
            table = self._user_item_table()
            self.on_device[device] = (self.pos_ptr.to(device), self.pos_items.to(device),
                                      None if table is None else table.to(device))
        return self.on_device[device]

    def _user_item_table(self) -> torch.Tensor | None:
        n_users = len(self.pos_ptr) - 1
        if self.n_items > TABLE_MAX_ITEMS or n_users * self.n_items > TABLE_MAX_ENTRIES:
            return None
        if self.table is None:
            table = torch.zeros((n_users, self.n_items), dtype=torch.bool)
            table[torch.repeat_interleave(torch.arange(n_users), self.pos_ptr[1:] - self.pos_ptr[:-1]),
                  self.pos_items] = True
            self.table = table
        return self.table

    def hard_negative_summary(self) -> dict:
        """Mean stored hard negatives per example, with a note when the stream has none."""
        if self.hard.shape[1] == 0:
            return {"hard_negatives_per_example": 0.0,
                    "hard_negatives_note": "no hard negatives: ranking logs empty or sample.hard_negatives is 0"}
        return {"hard_negatives_per_example": round(float((self.hard > 0).sum(dim=1).float().mean()), 3)}
