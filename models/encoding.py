"""Turn ids and feature values into model inputs: vocabularies (with OOV), numeric standardization.

Index 0 of every vocabulary means "unknown": ids or values never seen at fit time, nulls, and the
padding of multi-valued lists all map there, so inference never fails on new users or values. The
fitted encoder round-trips through JSON (encoder.json next to model.pt).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pandas.api.types import is_complex_dtype, is_numeric_dtype

from models.errors import ModelInputError
from models.parquet_stream import open_stream
from models.vocab import Vocab

HISTORY_COLUMN = "recent_items"
INTERACTIONS_TOTAL = "interactions_total"


def is_count_column(name: str) -> bool:
    """A user behaviour count (interactions_total, interactions_<w>d) that the user tower reads
    log-scaled. The rule lives here, in the bottom layer: the feature views that write these columns
    (features/) sit above the model library and follow it."""
    return name == INTERACTIONS_TOTAL or (name.startswith("interactions_") and name.endswith("d")
                                          and name[len("interactions_"):-1].isdigit())


# Standardized values are clipped here: a value of 1e99 (a typo, a fuzzer's POST /items) would reach
# the towers as inf and give a NaN vector. The fitted rows are never clipped below 1e8 of them: with
# ddof=0, no value of n lies further than sqrt(n - 1) standard deviations from their mean.
Z_LIMIT = 1e4


@dataclass
class NumericStats:
    """Standardize with the fit-time mean and std; nulls become the mean (0 after scaling).
    log: standardize log1p(max(x, 0)) instead (heavy-tailed counts)."""

    mean: float
    std: float
    log: bool = False

    @staticmethod
    def _values(values: pd.Series, log: bool) -> pd.Series:
        x = pd.to_numeric(pd.Series(values).reset_index(drop=True), errors="coerce").astype(float)
        return np.log1p(x.clip(lower=0)) if log else x

    @classmethod
    def fit(cls, values: pd.Series, log: bool = False) -> "NumericStats":
        x = cls._values(values, log)
        mean = float(x.mean()) if x.notna().any() else 0.0
        std = float(x.std(ddof=0)) if x.notna().sum() > 1 else 0.0
        return cls(mean=mean, std=std if std > 1e-12 else 1.0, log=log)

    def transform(self, values: pd.Series) -> np.ndarray:
        # numpy after the numeric read: the same values as _values (clip keeps NaN), without pandas'
        # per-call overhead on the one-row frames of serving
        x = _floats(values)
        if self.log:
            x = np.log1p(np.clip(x, 0, None))
        z = np.nan_to_num((x - self.mean) / self.std, nan=0.0)
        return np.clip(z, -Z_LIMIT, Z_LIMIT).astype(np.float32)


def _floats(values: pd.Series) -> np.ndarray:
    """`pd.to_numeric(values, errors="coerce").astype(float)` as a numpy array. A column already of a
    numeric or boolean dtype (every count, and a numeric feature of a known user) is converted
    directly: the four pandas calls cost ~0.1 ms each on serving's one-row frames, four columns a
    request; anything else (object columns: strings, None of an unknown user) goes through pandas."""
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    if is_numeric_dtype(series.dtype) and not is_complex_dtype(series.dtype):
        if isinstance(series.dtype, np.dtype):       # plain numpy: no missing-value marker but NaN
            return np.asarray(series.to_numpy(), dtype=np.float64)
        return series.to_numpy(dtype=np.float64, na_value=np.nan)     # Int64, boolean, arrow: pd.NA
    return pd.to_numeric(series.reset_index(drop=True), errors="coerce").astype(float).to_numpy()


def _flatten_lists(values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """List column → (flat values, parent row of each, position within its list). Nulls = empty."""
    flat, parents, positions = _flatten_arrow(values)
    return (pd.Series([], dtype=object) if flat is None else flat.to_pandas()), parents, positions


def _flatten_arrow(values: pd.Series) -> tuple[pa.Array | None, np.ndarray, np.ndarray]:
    """_flatten_lists with the flat values left in arrow (None: no list at all)."""
    series = pd.Series(values).reset_index(drop=True)
    if isinstance(series.dtype, pd.ArrowDtype):        # arrow-backed (streamed batches): no Python lists
        arr = pa.chunked_array(series.array.__arrow_array__()).combine_chunks()
    else:
        arr = pa.array(series.tolist(), from_pandas=True)
    if not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
        if len(arr) == 0 or arr.null_count == len(arr):
            return None, np.zeros(0, np.int64), np.zeros(0, np.int64)
        raise ModelInputError(f"expected a list column, got values of type {arr.type}")
    flat = arr.flatten()
    parents = pc.list_parent_indices(arr).to_numpy().astype(np.int64)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = np.arange(len(flat), dtype=np.int64) - starts[parents]
    return flat, parents, positions


def pad_lists(values: pd.Series, vocab: Vocab, max_len: int | None = None) -> np.ndarray:
    """List column → (n, L) int64 matrix of vocabulary indices, 0-padded, the first max_len kept."""
    n = len(values)
    flat, parents, positions = _flatten_arrow(values)
    keep = positions < max_len if max_len is not None else np.ones(len(positions), bool)
    idx = np.zeros(0, np.int64)
    if keep.any():
        idx = vocab.lookup(flat.filter(pa.array(keep)))     # hashed in arrow; a few values by the dict path
    width = int(positions[keep].max()) + 1 if keep.any() else 1
    out = np.zeros((n, width), dtype=np.int64)
    out[parents[keep], positions[keep]] = idx
    return out


def latest_per_user(examples: pd.DataFrame) -> pd.DataFrame:
    """Each user's latest row (by timestamp, the later row on ties), in time order: the rows of
    `sort_values("timestamp", kind="stable").drop_duplicates("user_id", keep="last")` without sorting
    the whole frame (at 10M examples that copy was 0.85 GB on top of the frame)."""
    if "timestamp" not in examples.columns:
        return examples.drop_duplicates("user_id", keep="last")
    order = examples["timestamp"].reset_index(drop=True).sort_values(kind="stable").index.to_numpy()
    later = pd.Series(examples["user_id"].to_numpy()[order]).duplicated(keep="last").to_numpy()
    return examples.iloc[order[~later]]


@dataclass
class SideEncoder:
    """Encoders for one side (users or items): its categorical, numeric and multi-valued columns."""

    categorical: dict[str, Vocab]
    numeric: dict[str, NumericStats]
    multi: dict[str, Vocab]

    @classmethod
    def fit(cls, frame: pd.DataFrame, kinds: dict[str, list[str]], what: str, min_count: int,
            counts: pd.DataFrame | None = None) -> "SideEncoder":
        """`frame` has one row per entity, so min_count counts distinct users/items per value.
        counts: behaviour count columns (numeric, log-scaled), fitted on all their rows."""
        cols = {k: list(kinds.get(k) or []) for k in ("categorical", "numeric", "multi")}
        missing = [c for cs in cols.values() for c in cs if c not in frame.columns]
        if missing:
            raise ModelInputError(f"{what}: feature columns {missing} listed in schema.json are missing")
        multi = {}
        for c in cols["multi"]:
            flat, _, _ = _flatten_lists(frame[c])
            multi[c] = Vocab.fit(flat, min_count=min_count)
        numeric = {c: NumericStats.fit(frame[c]) for c in cols["numeric"]}
        if counts is not None:
            numeric.update({c: NumericStats.fit(counts[c], log=True) for c in counts.columns})
        return cls(
            categorical={c: Vocab.fit(frame[c], min_count=min_count) for c in cols["categorical"]},
            numeric=numeric,
            multi=multi,
        )

    def encode(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """{'cat': (n, C) int64, 'num': (n, N) float32, 'multi:<col>': (n, L) int64}; absent columns → defaults."""
        n = len(frame)
        cat = np.zeros((n, len(self.categorical)), np.int64)
        for j, (c, v) in enumerate(self.categorical.items()):
            if c in frame.columns:
                cat[:, j] = v.lookup(frame[c])
        num = np.zeros((n, len(self.numeric)), np.float32)
        for j, (c, s) in enumerate(self.numeric.items()):
            if c in frame.columns:
                num[:, j] = s.transform(frame[c])
        out = {"cat": cat, "num": num}
        for c, v in self.multi.items():
            out[f"multi:{c}"] = pad_lists(frame[c], v) if c in frame.columns else np.zeros((n, 1), np.int64)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "categorical": {c: v.to_json() for c, v in self.categorical.items()},
            "numeric": {c: {"mean": s.mean, "std": s.std, "log": s.log} for c, s in self.numeric.items()},
            "multi": {c: v.to_json() for c, v in self.multi.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SideEncoder":
        return cls(
            categorical={c: Vocab.from_json(v) for c, v in d["categorical"].items()},
            numeric={c: NumericStats(**s) for c, s in d["numeric"].items()},
            multi={c: Vocab.from_json(v) for c, v in d["multi"].items()},
        )


def longest_list(chunks: Iterable) -> int:
    """Longest list over a column's chunks (arrow arrays or pandas list columns); at least 1."""
    best = 0
    for chunk in chunks:
        arr = chunk if isinstance(chunk, (pa.Array, pa.ChunkedArray)) else \
            pa.array(pd.Series(chunk).tolist(), from_pandas=True)
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            best = max(best, int(pc.max(pc.list_value_length(arr)).as_py() or 0))
    return max(best, 1)


def read_scalar_columns(path: Path) -> pd.DataFrame:
    """A parquet file of examples without its history lists (HISTORY_COLUMN), the widest column: read
    whole at 10M examples, the lists were most of a stage's memory (7 GB). Stages that need some
    rows' lists read them alone (read_rows)."""
    return pd.read_parquet(path, columns=[c for c in pq.read_schema(path).names if c != HISTORY_COLUMN])


def read_rows(path: Path, rows: np.ndarray, columns: list[str], batch_rows: int = 200_000) -> pd.DataFrame:
    """The given rows (positions in the file, distinct, any order) of a parquet file's columns, in the
    order given, read batch_rows rows at a time: memory grows with the rows asked for, not the file.
    Converted as pd.read_parquet converts them."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    wanted, taken, start = rows[order], [], 0
    f = open_stream(path)
    for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
        lo, hi = np.searchsorted(wanted, [start, start + batch.num_rows])
        taken.append(batch.take(pa.array(wanted[lo:hi] - start)))
        start += batch.num_rows
    schema = f.schema_arrow
    table = pa.Table.from_batches(taken, schema=pa.schema([schema.field(c) for c in columns], schema.metadata))
    inverse = np.empty(len(rows), dtype=np.int64)
    inverse[order] = np.arange(len(rows))
    return table.take(pa.array(inverse)).to_pandas()


def parquet_column(path: Path, column: str, batch_rows: int) -> Iterator[pa.Array]:
    """One column of a parquet file, batch_rows rows at a time (nothing when it has no such column)."""
    f = open_stream(path)
    if column in f.schema_arrow.names:
        yield from (b.column(0) for b in f.iter_batches(batch_size=batch_rows, columns=[column]))


def _longest_list(frame: pd.DataFrame, column: str) -> int:
    return longest_list([frame[column]]) if column in frame.columns else 1


def _id_kind(dtype_name: str) -> str:
    return "int64" if dtype_name.startswith("int") else "string"


@dataclass
class FeatureEncoder:
    """Everything that maps raw rows to model inputs; fitted on the catalog and the training rows."""

    item_ids: Vocab
    user_ids: Vocab
    users: SideEncoder
    items: SideEncoder
    history_length: int

    @classmethod
    def fit(cls, schema: dict[str, Any], items: pd.DataFrame, examples: pd.DataFrame,
            min_count: int = 1, history_length: int | None = None,
            behaviour_counts: bool = True) -> "FeatureEncoder":
        """Item ids from the whole catalog (items without interactions still get a vector from their
        features), then any item ids that only occur in examples; user values from the examples.
        history_length None: the longest recent_items list in the examples (longer ones are cut).
        The behaviour counts in the examples (interactions_total, interactions_<w>d) are user
        numeric inputs, log-scaled and standardized over all example rows (each row's own counts),
        unless behaviour_counts is False."""
        for frame, col, what in ((items, "item_id", "items.parquet"), (examples, "user_id", "examples.parquet"),
                                 (examples, "item_id", "examples.parquet")):
            if col not in frame.columns:
                raise ModelInputError(f"{what}: required column '{col}' is missing")
        item_kind = _id_kind(schema.get("item_id_dtype", "string"))
        all_items = pd.concat([items["item_id"], examples["item_id"]], ignore_index=True)
        # one row per user (its latest features), so min_count counts users, not interactions
        latest = latest_per_user(examples)
        return cls(
            item_ids=Vocab.fit(all_items, kind=item_kind),
            user_ids=Vocab.fit(latest["user_id"], kind=_id_kind(schema.get("user_id_dtype", "string"))),
            users=SideEncoder.fit(latest, schema.get("user_features", {}), "examples.parquet", min_count,
                                  counts=examples[[c for c in examples.columns if is_count_column(c)]]
                                  if behaviour_counts else None),
            items=SideEncoder.fit(items.drop_duplicates("item_id"), schema.get("item_features", {}),
                                  "items.parquet", min_count),
            history_length=history_length or _longest_list(examples, HISTORY_COLUMN),
        )

    def encode_items(self, items: pd.DataFrame) -> dict[str, np.ndarray]:
        """Item tower inputs: 'item' (n,) + the item side's feature arrays."""
        return {"item": self.item_ids.lookup(items["item_id"]), **self.items.encode(items)}

    def encode_users(self, users: pd.DataFrame) -> dict[str, np.ndarray]:
        """User tower inputs: 'user' (n,), 'history' (n, H) item indices newest first, + features."""
        n = len(users)
        user = self.user_ids.lookup(users["user_id"]) if "user_id" in users.columns else np.zeros(n, np.int64)
        if HISTORY_COLUMN in users.columns:
            history = pad_lists(users[HISTORY_COLUMN], self.item_ids, self.history_length)
        else:
            history = np.zeros((n, 1), np.int64)
        return {"user": user, "history": history, **self.users.encode(users)}

    def to_json(self) -> dict[str, Any]:
        return {"item_ids": self.item_ids.to_json(), "user_ids": self.user_ids.to_json(),
                "users": self.users.to_json(), "items": self.items.to_json(),
                "history_length": self.history_length}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FeatureEncoder":
        return cls(item_ids=Vocab.from_json(d["item_ids"]), user_ids=Vocab.from_json(d["user_ids"]),
                   users=SideEncoder.from_json(d["users"]), items=SideEncoder.from_json(d["items"]),
                   history_length=int(d["history_length"]))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> "FeatureEncoder":
        return cls.from_json(json.loads(path.read_text()))
